//! Reads of the sharded memory: exact top-k by `q . k / tau` with the query's own example masked
//! out and ties broken by ring slot (oldest first), so that a read at any world size returns what
//! one unsharded memory returns — scores, entries and order.
//!
//! At world size W > 1 a read is two-stage, and what a rank receives does not grow with W d_v:
//! 1. The ranks' queries and example ids are all-gathered (`(b, d_k + 2)` f32 each); every shard
//!    finds its local top-k candidates for every query and sends each query's owner only (score,
//!    slot) per candidate, 8 bytes, through an all-to-all. The owner merges its `W k` candidates
//!    per query into the global top-k with the one tie rule.
//! 2. The owner asks the shards that hold its winners for their rows (an all-to-all of local row
//!    numbers) and gets back their keys, values and ids (a second all-to-all, `b k` rows at most).
//!
//! Bytes a rank receives per read over the CPU ring (`Collective::traffic` counts them, headers
//! included; `b_s` queries on rank s, B in all, `n_{o->r}` winners of rank o held by rank r):
//! `sum_{s != r} (24 + b_s (4 d_k + 8))` (queries) `+ (W-1)(16 + 8 b_r k)` (candidates)
//! `+ sum_{o != r} (16 + 8 n_{o->r})` (requests) `+ sum_{s != r} (16 + 4 (d_k + d_v + 2) n_{r->s})`
//! (rows): at most about `B (4 d_k + 16 k + 8) + 4 b k (d_k + d_v + 2) + 72 W` — 2.6 MB at W = 64,
//! B = 512, k = 16, d_k = 128, d_v = 4096, where gathering every shard's results took 8.9 GB.
//! Collectives per read: one all-gather and three all-to-alls (the candidates' counts are known to
//! both sides; the requests' are not, which costs NCCL one more small all-to-all, the ring none).
//! Host syncs per read on a GPU: none in one process (the self-exclusion compares ids on the
//! device, and the top-k there is exact without a tie check); at W > 1 the gather's row counts,
//! the requests' per-shard counts and the NCCL count exchange: 3.
use super::store::{i64_as_columns, i64_from_columns, ShardedKvMemory, NO_SLOT};
use crate::dist::Collective;
use crate::error::Result;
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

/// A shard's (or the merged) top-k before any key or value is read: `scores (q, k)` f32 and
/// ring `slots (q, k)` i64, sorted by score then slot; -inf scores (padding, or excluded) have
/// slot [`NO_SLOT`].
struct Candidates {
    scores: Tensor,
    slots: Tensor,
}

/// A slot as it travels (i32: memory.capacity is below 2^31); NO_SLOT as i32::MAX.
const WIRE_NO_SLOT: i64 = i32::MAX as i64;

impl ShardedKvMemory {
    /// Top-`k` of this shard for `queries (q, d_k)`, excluding entries whose id equals the
    /// query's; ties broken by ring slot.
    pub fn search_local(
        &self,
        queries: &Tensor,
        query_ids: &Tensor,
        k: usize,
    ) -> Result<Retrieved> {
        let c = self.candidates(queries, query_ids, k)?;
        Ok(self.materialize(c))
    }

    /// This shard's top-`k` candidates (scores and slots only).
    fn candidates(&self, queries: &Tensor, query_ids: &Tensor, k: usize) -> Result<Candidates> {
        let q = queries.size()[0];
        let filled = self.filled_rows();
        let device = self.keys.device();
        let k = k as i64;
        if filled == 0 || q == 0 {
            return Ok(Candidates {
                scores: Tensor::full([q, k], f64::NEG_INFINITY, (Kind::Float, device)),
                slots: Tensor::full([q, k], NO_SLOT, (Kind::Int64, device)),
            });
        }
        // Scored in f32 whatever the bank holds (bf16 keys: a transient f32 copy of the shard's
        // keys), so that the rescored read at W > 1 equals the one-process read.
        let keys = self.keys.narrow(0, 0, filled).to_kind(Kind::Float);
        let mut scores = (queries.to_kind(Kind::Float) / self.tau).matmul(&keys.tr()); // (q, n)
                                                                                       // A NaN score would sort first in top-k: it ranks last instead. Then the self-exclusion:
                                                                                       // the rows holding a query's own example, compared on the device. Both in place (a
                                                                                       // second (q, n) tensor would double the read's memory traffic).
        let nan = scores.isnan();
        let _ = scores.masked_fill_(&nan, f64::NEG_INFINITY);
        let own = self
            .ids
            .narrow(0, 0, filled)
            .unsqueeze(0)
            .eq_tensor(&query_ids.to_device(device).unsqueeze(1)); // (q, n)
        let _ = scores.masked_fill_(&own, f64::NEG_INFINITY);
        // On a GPU the branch-free exact key (no host sync; its extra elementwise passes cost
        // little there); on the CPU, where a read is not a sync, topk on the scores with a tie
        // check is 3x faster. Both pick the same columns (tested below).
        let cols = if device.is_cuda() {
            top_rows(&scores, k.min(filled))
        } else {
            top_rows_checked(&scores, k.min(filled))
        };
        let picked = scores.gather(1, &cols, false);
        let slots = self.slot_of(&cols).masked_fill(&picked.isinf(), NO_SLOT);
        let sorted = sorted_by_score_then_slot(Candidates {
            scores: picked,
            slots,
        });
        Ok(pad_to(sorted, k))
    }

    /// Keys, values and ids of this shard's candidates.
    fn materialize(&self, c: Candidates) -> Retrieved {
        let (q, k) = (c.scores.size()[0], c.scores.size()[1]);
        let invalid = c.slots.eq(NO_SLOT);
        let rows = self.row_of(&c.slots).masked_fill(&invalid, 0).reshape([-1]);
        let (keys, values, ids) = if self.filled_rows() == 0 {
            let (d_k, d_v) = self.dims();
            let device = self.keys.device();
            (
                Tensor::zeros([q, k, d_k], (Kind::Float, device)),
                Tensor::zeros([q, k, d_v], (Kind::Float, device)),
                Tensor::full([q, k], -1, (Kind::Int64, device)),
            )
        } else {
            let pick = |t: &Tensor| t.index_select(0, &rows);
            let no = invalid.unsqueeze(-1);
            (
                pick(&self.keys)
                    .to_kind(Kind::Float)
                    .view([q, k, -1])
                    .masked_fill(&no, 0.0),
                pick(&self.values).view([q, k, -1]).masked_fill(&no, 0.0),
                pick(&self.ids).view([q, k]).masked_fill(&invalid, -1),
            )
        };
        Retrieved {
            scores: c.scores,
            values,
            keys,
            ids,
            slots: c.slots,
        }
    }

    /// The global top-`k` for this rank's `queries (q, d_k)` and their example ids `(q,)`.
    /// Collective when sharded: every rank calls it with its own queries (see the module doc).
    pub fn read(
        &self,
        group: &dyn Collective,
        queries: &Tensor,
        query_ids: &Tensor,
        k: usize,
    ) -> Result<Retrieved> {
        let w = group.world_size();
        if w == 1 {
            return self.search_local(queries, query_ids, k);
        }
        let (me, device, ki) = (group.rank(), self.keys.device(), k as i64);
        // Stage 1: every rank's queries; every shard's candidates to their owners.
        let (all_q, all_ids, counts) = gather_queries(group, queries, query_ids, device)?;
        let local = self.candidates(&all_q, &all_ids, k)?;
        let mut offset = 0;
        let mut send = Vec::with_capacity(w);
        for &b in &counts {
            let rows = |t: &Tensor| t.narrow(0, offset, b).reshape([-1, 1]);
            let slots = rows(&local.slots).clamp_max(WIRE_NO_SLOT);
            send.push(Tensor::cat(
                &[
                    rows(&local.scores).view_dtype(Kind::Int),
                    slots.to_kind(Kind::Int),
                ],
                1,
            ));
            offset += b;
        }
        let b = counts[me];
        let got = group.all_to_all(&send, Some(&vec![b * ki; w]))?;
        let got = Tensor::cat(&got, 0)
            .view([w as i64, b, ki, 2])
            .permute([1, 0, 2, 3]);
        let got = got.reshape([b, w as i64 * ki, 2]);
        let slots = got.select(2, 1).to_kind(Kind::Int64);
        let merged = sorted_by_score_then_slot(Candidates {
            scores: got.select(2, 0).contiguous().view_dtype(Kind::Float),
            slots: slots.masked_fill(&slots.eq(WIRE_NO_SLOT), NO_SLOT),
        });
        let (scores, slots) = (
            merged.scores.narrow(1, 0, ki),
            merged.slots.narrow(1, 0, ki),
        );
        // Stage 2: the winners' rows from the shards that hold them.
        let (keys, values, ids) = self.fetch(group, &slots)?;
        Ok(Retrieved {
            scores: self.rescored(queries, &keys, &scores),
            values,
            keys,
            ids,
            slots,
        })
    }

    /// The scores of a sharded read again from this rank's `queries` (the gathered ones were
    /// detached), so that its gradient reaches the query projection as in one process:
    /// q . k / tau of the chosen `keys`, -inf where `scores` found none.
    fn rescored(&self, queries: &Tensor, keys: &Tensor, scores: &Tensor) -> Tensor {
        let again = (queries.to_kind(Kind::Float) / self.tau)
            .unsqueeze(1)
            .matmul(&keys.transpose(1, 2))
            .squeeze_dim(1);
        again.where_self(&scores.isfinite(), scores)
    }

    /// Keys `(b, k, d_k)`, values `(b, k, d_v)` and ids `(b, k)` of the ring `slots (b, k)`
    /// (NO_SLOT: zeros and id -1), asked of the shards that hold them. Collective.
    fn fetch(&self, group: &dyn Collective, slots: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (w, device) = (group.world_size() as i64, self.keys.device());
        let (b, k) = (slots.size()[0], slots.size()[1]);
        let (d_k, d_v) = self.dims();
        let flat = slots.reshape([-1]);
        let wanted = flat.ne(NO_SLOT).nonzero().squeeze_dim(1);
        let wanted_slots = flat.index_select(0, &wanted);
        let shard = wanted_slots.remainder(w);
        let order = shard.argsort_stable(true, 0, false);
        let (position, shard) = (
            wanted.index_select(0, &order),
            shard.index_select(0, &order),
        );
        let rows = wanted_slots
            .index_select(0, &order)
            .divide_scalar_mode(w, "floor");
        let per_shard = crate::host::i64s(&shard.bincount(None::<Tensor>, w))?;
        let mut send = Vec::with_capacity(w as usize);
        let mut offset = 0;
        for &n in &per_shard {
            send.push(rows.narrow(0, offset, n));
            offset += n;
        }
        let asked = group.all_to_all(&send, None)?;
        let replies: Vec<Tensor> = asked.iter().map(|rows| self.rows(rows)).collect();
        let answered = Tensor::cat(&group.all_to_all(&replies, Some(&per_shard))?, 0);
        let width = d_k + d_v + 2;
        let mut full = Tensor::zeros([b * k, width], (Kind::Float, device));
        let _ = full.index_copy_(0, &position, &answered.to_device(device));
        let ids = i64_from_columns(&full, d_k + d_v).view([b, k]);
        let invalid = slots.eq(NO_SLOT);
        Ok((
            full.narrow(1, 0, d_k).reshape([b, k, d_k]),
            full.narrow(1, d_k, d_v).reshape([b, k, d_v]),
            ids.masked_fill(&invalid, -1),
        ))
    }

    /// Local `rows` as `(n, d_k + d_v + 2)` f32: key, value, and the id's bits.
    fn rows(&self, rows: &Tensor) -> Tensor {
        let rows = rows.to_device(self.keys.device());
        let ids = self.ids.index_select(0, &rows).reshape([-1, 1]);
        Tensor::cat(
            &[
                self.keys.index_select(0, &rows).to_kind(Kind::Float),
                self.values.index_select(0, &rows),
                i64_as_columns(&ids),
            ],
            1,
        )
    }

    /// The read as it was before the two-stage one: every shard searches every query and all five
    /// result tensors are all-gathered (each rank receives `W B k (4 (d_k + d_v) + 20)` bytes).
    /// Kept as the baseline of `umtune bench-memory-read` and as a cross-check in tests.
    pub fn read_gathering(
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
        let gather = |t: &Tensor| -> Result<Tensor> {
            let parts = group.all_gather(t)?;
            let mine: Vec<Tensor> = parts
                .into_iter()
                .map(|x| x.narrow(0, offset, mine).to_device(device))
                .collect();
            Ok(Tensor::cat(&mine, 1))
        };
        let (scores, slots) = (gather(&local.scores)?, gather(&local.slots)?);
        let (values, keys, ids) = (
            gather(&local.values)?,
            gather(&local.keys)?,
            gather(&local.ids)?,
        );
        let order = score_then_slot_order(&scores, &slots).narrow(1, 0, k as i64);
        let (scores, keys) = (take(&scores, &order), take(&keys, &order));
        Ok(Retrieved {
            scores: self.rescored(queries, &keys, &scores),
            values: take(&values, &order),
            keys,
            ids: take(&ids, &order),
            slots: take(&slots, &order),
        })
    }
}

/// Every rank's queries `(B, d_k)` f32 and ids `(B,)` on `device`, in rank order, and each
/// rank's count: one all-gather of `(b, d_k + 2)` rows (the id's bits in two f32 columns).
fn gather_queries(
    group: &dyn Collective,
    queries: &Tensor,
    query_ids: &Tensor,
    device: Device,
) -> Result<(Tensor, Tensor, Vec<i64>)> {
    let ids = query_ids
        .to_kind(Kind::Int64)
        .to_device(device)
        .reshape([-1, 1]);
    let packed = Tensor::cat(
        &[
            queries.detach().to_kind(Kind::Float).to_device(device),
            i64_as_columns(&ids),
        ],
        1,
    );
    let parts = group.all_gather(&packed)?;
    let counts = parts.iter().map(|t| t.size()[0]).collect();
    let all = Tensor::cat(&parts, 0).to_device(device);
    let d_k = queries.size()[1];
    let all_ids = i64_from_columns(&all, d_k);
    Ok((all.narrow(1, 0, d_k), all_ids, counts))
}

/// The permutation of each row of `scores (q, n)` / `slots (q, n)` that sorts by score (high
/// first), equal scores by slot (low first): two stable sorts.
fn score_then_slot_order(scores: &Tensor, slots: &Tensor) -> Tensor {
    let by_slot = slots.argsort_stable(true, 1, false);
    let by_score = scores
        .gather(1, &by_slot, false)
        .argsort_stable(true, 1, true);
    by_slot.gather(1, &by_score, false)
}

/// The columns of the `k` largest of each row of `scores (q, n)` f32, the lowest column (the
/// shard's oldest row) first among equal scores: one top-k over an exact i64 key, the score's
/// bits made order-preserving (non-negative floats keep their bits; negative ones, whose bits
/// order backwards, map below them in reverse) times 2^31 plus the reversed column. No branch on
/// the data, so no host sync (a top-k on the scores alone needs to look for a tie at the k-th
/// place, and a tie needs a second pass). `n` < 2^31 (memory.capacity).
fn top_rows(scores: &Tensor, k: i64) -> Tensor {
    let n = scores.size()[1];
    // + 0.0 turns -0.0 into +0.0, which compare equal as floats but not as bits.
    let bits = (scores + 0.0)
        .contiguous()
        .view_dtype(Kind::Int)
        .to_kind(Kind::Int64); // (q, n)
    let negative = bits.lt(0);
    let ordered = bits.where_self(
        &negative.logical_not(),
        &(-bits.shallow_clone() - (1i64 << 31) - 1),
    );
    let reversed_col = -Tensor::arange(n, (Kind::Int64, scores.device())) + ((1i64 << 31) - 1);
    let key = ordered * (1i64 << 31) + reversed_col.unsqueeze(0);
    key.topk(k, 1, true, true).1
}

/// [`top_rows`] on the CPU, where reading a value is not a sync: topk on the scores, then a tie
/// check read on the host: where the k-th and
/// (k+1)-th scores of some row are equal (and finite), everything above the k-th score and then
/// the lowest columns among those equal to it.
fn top_rows_checked(scores: &Tensor, kk: i64) -> Tensor {
    let (q, filled) = (scores.size()[0], scores.size()[1]);
    // Fast path: the (k+1)-th score is below the k-th in every row, so topk's set is exact.
    let (top, top_cols) = scores.topk((kk + 1).min(filled), 1, true, true);
    let boundary_tie = kk < filled
        && crate::host::cpu_bool_of(
            &top.narrow(1, kk - 1, 1)
                .eq_tensor(&top.narrow(1, kk, 1))
                .logical_and(&top.narrow(1, kk - 1, 1).isfinite())
                .any(),
        );
    if !boundary_tie {
        return top_cols.narrow(1, 0, kk).contiguous();
    }
    let kth = top.narrow(1, kk - 1, 1); // (q, 1)
    let above = scores.gt_tensor(&kth);
    let equal = scores.eq_tensor(&kth);
    let room = -above.sum_dim_intlist(1, true, Kind::Int64) + kk; // (q, 1)
                                                                  // Exactly kk per row, in column order.
    let take = above.logical_or(&equal.logical_and(&equal.cumsum(1, Kind::Int64).le_tensor(&room)));
    take.nonzero().select(1, 1).view([q, kk])
}

/// Columns `order (q, m)` of `t (q, n)` or `(q, n, d)`.
fn take(t: &Tensor, order: &Tensor) -> Tensor {
    if t.dim() == 3 {
        let d = t.size()[2];
        t.gather(1, &order.unsqueeze(-1).expand([-1, -1, d], false), false)
    } else {
        t.gather(1, order, false)
    }
}

fn sorted_by_score_then_slot(c: Candidates) -> Candidates {
    let order = score_then_slot_order(&c.scores, &c.slots);
    Candidates {
        scores: take(&c.scores, &order),
        slots: take(&c.slots, &order),
    }
}

/// Pads candidates of fewer than `k` columns (a shard smaller than k) with empty ones.
fn pad_to(c: Candidates, k: i64) -> Candidates {
    let (q, have) = (c.scores.size()[0], c.scores.size()[1]);
    if have >= k {
        return c;
    }
    let device = c.scores.device();
    Candidates {
        scores: Tensor::cat(
            &[
                c.scores,
                Tensor::full([q, k - have], f64::NEG_INFINITY, (Kind::Float, device)),
            ],
            1,
        ),
        slots: Tensor::cat(
            &[
                c.slots,
                Tensor::full([q, k - have], NO_SLOT, (Kind::Int64, device)),
            ],
            1,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU's branch-free top-k picks exactly the CPU path's columns on scores full of ties
    /// (a lattice of values with -inf, -0.0 and +0.0 among them), at every k. Among -inf scores
    /// (excluded entries, which a read turns into no entry) either may pick any.
    #[test]
    fn the_branch_free_top_k_equals_the_checked_one() {
        tch::manual_seed(3);
        let lattice = Tensor::from_slice(&[-1.5f32, -0.0, 0.0, 0.25, f32::NEG_INFINITY, 2.0]);
        let pick = Tensor::randint(6, [7, 40], (Kind::Int64, Device::Cpu));
        let scores = lattice.index_select(0, &pick.reshape([-1])).view([7, 40]);
        let finite = |cols: Tensor| {
            let picked = scores.gather(1, &cols, false);
            cols.masked_fill(&picked.isinf(), -1).sort(1, false).0
        };
        for k in [1, 2, 5, 17, 39, 40] {
            let a = finite(top_rows(&scores, k));
            let b = finite(top_rows_checked(&scores, k));
            assert!(a.equal(&b), "k = {k}:\n{a}\n{b}");
        }
    }
}
