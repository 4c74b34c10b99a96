//! The memory inside the model (METHOD.md section 2): at block m, query
//! `q = normalize(W_q pool(h_m))`, read the top-k entries `r`, and fuse with the uncertainty-aware
//! gate `g = sigmoid(W_g [h ; r ; log p] + b_g)` (b_g = -2; `log p` only with UM at block m):
//! `h <- h + g * W_o r`, `W_o` zero-initialized so that a fresh model is exactly the backbone.
//! With `memory.normalize` (the default) the gate and the output projection see scale-free
//! inputs: `g = sigmoid(W_g [rms(h) ; rms(r) ; log(p) / 10] + b_g)` and `h <- h + g * W_o rms(r)`,
//! where `rms(x) = x / sqrt(mean(x^2))` per position. A LLaMA residual stream has an RMS of tens
//! (60 for SmolLM2's last block), so raw inputs saturate the gate from the first step (b_g = -2
//! is then meaningless) and make each AdamW step of `W_o` move the hidden state by a large
//! fraction of its scale; measured in issue 10 (see the README's method section).
//! Granularity: one read per sequence (the last real token) for classification, fused at every
//! position; one read per token for NER. In training the batch's detached
//! `(normalize(W_k pool(h_m)), pool(h_m), example id)` wait in `pending` until the trainer commits
//! them after the optimizer step; an in-batch InfoNCE between queries and keys (weight
//! `lambda_mem`) is what trains `W_k`, whose keys are otherwise detached. A prebuilt memory
//! (`umtune memory build`) records entries the same way in a pass without training; its file
//! keeps the `W_k` the keys were made with, so a run that starts from it queries consistent keys.
use super::store::ShardedKvMemory;
use crate::config::MemoryConfig;
use crate::dist::Collective;
use crate::error::Error;
use crate::error::Result;
use crate::heads::classification::last_token;
use crate::probe::Probe;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

pub struct MemoryFusion {
    pub layer: usize,
    w_k: nn::Linear,
    w_q: nn::Linear,
    w_g: nn::Linear,
    w_o: nn::Linear,
    /// Scale-free gate inputs and values (see the module doc).
    normalize: bool,
    top_k: usize,
    tau: f64,
    per_token: bool,
    pub lambda_mem: f64,
    memory: Mutex<ShardedKvMemory>,
    group: Arc<dyn Collective>,
    /// Entries of the micro-batches since the last optimizer step.
    pending: Mutex<Vec<(Tensor, Tensor, Tensor)>>,
}

/// How a fusion pass runs.
pub struct FusionMode<'a> {
    /// Adds the InfoNCE term.
    pub training: bool,
    /// Keeps the batch's entries for the next [`MemoryFusion::commit`].
    pub record: bool,
    /// Where the diagnostics go (when on).
    pub probe: &'a Probe,
}

/// What one fused forward pass leaves for the loss.
pub struct FusionOutput {
    pub hidden: Tensor,
    /// In-batch InfoNCE between queries and keys (training only).
    pub contrastive: Option<Tensor>,
}

/// `x / sqrt(mean(x^2))` over the last dimension (RMS normalization without a scale); zero
/// rows (empty reads) stay zero.
fn rms_normalized(x: &Tensor) -> Tensor {
    x / (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-6).sqrt()
}

fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12)
}

impl MemoryFusion {
    /// `with_uncertainty`: whether UM provides p at `layer` (then the gate sees log p).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &nn::Path,
        cfg: &MemoryConfig,
        layer: usize,
        d: i64,
        per_token: bool,
        with_uncertainty: bool,
        group: Arc<dyn Collective>,
    ) -> Self {
        let p = p / "memory";
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        let gate_in = if with_uncertainty { 3 * d } else { 2 * d };
        let gate = nn::LinearConfig {
            bs_init: Some(nn::Init::Const(-2.0)),
            ..Default::default()
        };
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bias: false,
            ..Default::default()
        };
        let memory = ShardedKvMemory::new(cfg, d, group.rank(), group.world_size(), p.device());
        MemoryFusion {
            layer,
            w_k: nn::linear(&p / "w_k", d, cfg.key_size, no_bias),
            w_q: nn::linear(&p / "w_q", d, cfg.key_size, no_bias),
            w_g: nn::linear(&p / "w_g", gate_in, d, gate),
            w_o: nn::linear(&p / "w_o", d, d, zero),
            normalize: cfg.normalize,
            top_k: cfg.k,
            tau: cfg.tau,
            per_token,
            lambda_mem: cfg.lambda_mem,
            memory: Mutex::new(memory),
            group,
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Fuses the memory into `hidden (b, t, d)` at block m. `mask (b, t)`, `example_ids (b,)`,
    /// `p (b, t, d)` UM's variance at this block if any; `mode` says whether to train, record
    /// and probe.
    pub fn forward(
        &self,
        hidden: &Tensor,
        mask: &Tensor,
        example_ids: &Tensor,
        p: Option<&Tensor>,
        mode: FusionMode,
    ) -> Result<FusionOutput> {
        let FusionMode {
            training,
            record,
            probe,
        } = mode;
        let h = hidden.to_kind(Kind::Float);
        let (b_sz, seq_len, d) = h.size3()?;
        // Rows that query and get written: (n, d) with their example ids (n,).
        let (rows, row_ids, select) = if self.per_token {
            let keep = mask.reshape([-1]).ne(0).nonzero().squeeze_dim(1);
            let ids = example_ids
                .unsqueeze(1)
                .expand([b_sz, seq_len], false)
                .reshape([-1])
                .index_select(0, &keep);
            (h.reshape([-1, d]).index_select(0, &keep), ids, Some(keep))
        } else {
            (last_token(&h, mask), example_ids.shallow_clone(), None)
        };
        let q = normalize(&self.w_q.forward(&rows));
        let read = self
            .store()?
            .read(self.group.as_ref(), &q, &row_ids, self.top_k)?;
        let r_rows = read.weighted_values(); // (n, d)
        let r = match &select {
            Some(keep) => Tensor::zeros([b_sz * seq_len, d], (Kind::Float, h.device()))
                .index_copy(0, keep, &r_rows)
                .view([b_sz, seq_len, d]),
            None => r_rows.unsqueeze(1).expand([b_sz, seq_len, d], false),
        };
        let (h_in, r_in) = if self.normalize {
            (rms_normalized(&h), rms_normalized(&r))
        } else {
            (h.shallow_clone(), r.shallow_clone())
        };
        let mut gate_in = vec![h_in, r_in.shallow_clone()];
        if let Some(p) = p {
            let log_p = p.clamp_min(1e-12).log();
            probe.range("memory.gate_log_p", &log_p);
            gate_in.push(if self.normalize { log_p / 10.0 } else { log_p });
        }
        let pre = self.w_g.forward(&Tensor::cat(&gate_in, -1));
        probe.range("memory.gate_preactivation", &pre);
        let g = pre.sigmoid();
        let update = g.shallow_clone() * self.w_o.forward(&r_in);
        if probe.is_on() {
            let rms = |t: &Tensor| t.detach().pow_tensor_scalar(2).mean(Kind::Float).sqrt();
            let (h_rms, r_rms, u_rms) = (rms(&h), rms(&r), rms(&update));
            probe.record("memory.update_to_hidden", || {
                &u_rms / h_rms.clamp_min(1e-12)
            });
            probe.record("memory.hidden_rms", || h_rms);
            probe.record("memory.value_rms", || r_rms);
            probe.record("memory.gate_mean", || g.detach().mean(Kind::Float));
            probe.record("memory.gate_max", || g.detach().max());
        }
        let fused = hidden + update.to_kind(hidden.kind());
        let mut contrastive = None;
        if training || record {
            let k = normalize(&self.w_k.forward(&rows));
            if training && self.lambda_mem > 0.0 {
                let (qa, ka) = self.global_pairs(&q, &k)?;
                let n = qa.size()[0];
                if n > 1 {
                    let logits = qa.matmul(&ka.tr()) / self.tau;
                    let target = Tensor::arange(n, (Kind::Int64, h.device()));
                    let infonce = logits.cross_entropy_for_logits(&target);
                    probe.record("memory.infonce", || infonce.detach());
                    // The gradient through this rank's rows, times W: averaged over the ranks it
                    // is the global loss's gradient; the value stays the global loss.
                    let w = self.group.world_size() as f64;
                    let infonce = if w > 1.0 {
                        &infonce * w - infonce.detach() * (w - 1.0)
                    } else {
                        infonce
                    };
                    contrastive = Some(infonce * self.lambda_mem);
                }
            }
            self.pending()?.push((k.detach(), rows.detach(), row_ids));
        }
        Ok(FusionOutput {
            hidden: fused,
            contrastive,
        })
    }

    /// The store, locked (it is shared by forward passes and commits).
    pub fn store(&self) -> Result<std::sync::MutexGuard<'_, ShardedKvMemory>> {
        self.memory
            .lock()
            .map_err(|_| crate::error::Error::Collective {
                rank: self.group.rank(),
                msg: "memory lock poisoned by a panic".into(),
            })
    }

    /// The whole ring's tensors and `w_k`, in slot order whatever the world size (to inspect or
    /// compare). Collective when sharded.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut t = self.store()?.global_tensors(self.group.as_ref())?;
        t.push(("w_k".into(), self.w_k.ws.detach()));
        Ok(t)
    }

    /// Saves the entries as shards + index at `index` (see [`super::files`]); with `with_w_k`
    /// also `W_k` (a prebuilt memory carries the projection its keys were made with).
    /// Collective: every rank writes its shard.
    pub fn save(&self, index: &Path, with_w_k: bool) -> Result<crate::atomic_file::FileDigest> {
        self.save_with(index, with_w_k, super::files::Commit::Now)
    }

    /// [`Self::save`] in two phases (see [`super::files::Commit::Staged`]).
    pub fn save_staged(
        &self,
        index: &Path,
        with_w_k: bool,
    ) -> Result<crate::atomic_file::FileDigest> {
        self.save_with(index, with_w_k, super::files::Commit::Staged)
    }

    fn save_with(
        &self,
        index: &Path,
        with_w_k: bool,
        commit: super::files::Commit,
    ) -> Result<crate::atomic_file::FileDigest> {
        let (shard, capacity, written) = {
            let store = self.store()?;
            (store.shard_tensors(), store.capacity(), store.written())
        };
        let w_k = self.w_k.ws.detach();
        let contents = super::files::Contents {
            capacity,
            written,
            shard: &shard,
            w_k: with_w_k.then_some(&w_k),
        };
        super::files::save(self.group.as_ref(), index, &contents, commit)
    }

    /// Restores the store from a saved memory at any world size (see [`super::files::load`]);
    /// with `with_w_k` also `W_k` (a prebuilt memory, whose keys were made with it).
    pub fn load(&self, path: &Path, with_w_k: bool) -> Result<()> {
        let (rank, world) = (self.group.rank(), self.group.world_size());
        super::files::load_with(path, rank, world, |saved| {
            self.restore_from(saved, path, with_w_k)
        })
    }

    /// The shards of the memory at `path` this rank needs, mapped and not yet checked (see
    /// [`super::files::map`]).
    pub fn map(&self, path: &Path) -> Result<super::files::Loaded> {
        super::files::map(path, self.group.rank(), self.group.world_size())
    }

    /// Copies what [`Self::map`] mapped into the store (and `W_k` with `with_w_k`); the caller
    /// runs the shards' checks beside it.
    pub fn restore_from(
        &self,
        saved: &super::files::Loaded,
        path: &Path,
        with_w_k: bool,
    ) -> Result<()> {
        if with_w_k {
            let (w, file) = saved.w_k.as_ref().ok_or_else(|| {
                Error::tensor(
                    path,
                    "w_k",
                    "missing (not a file of `umtune memory build`?)",
                )
            })?;
            if w.size() != self.w_k.ws.size() {
                return Err(Error::tensor(
                    file,
                    "w_k",
                    format!(
                        "has shape {:?}, this model's is {:?}",
                        w.size(),
                        self.w_k.ws.size()
                    ),
                ));
            }
            let mut ws = self.w_k.ws.shallow_clone();
            tch::no_grad(|| ws.copy_(w));
        }
        self.store()?.restore(saved, path)
    }

    fn pending(&self) -> Result<std::sync::MutexGuard<'_, Vec<(Tensor, Tensor, Tensor)>>> {
        self.pending.lock().map_err(|_| {
            Error::Internal("the memory's pending entries: a thread panicked holding them".into())
        })
    }

    /// Drops the entries recorded since the last commit (a skipped, non-finite step).
    pub fn discard_pending(&self) -> Result<()> {
        self.pending()?.clear();
        Ok(())
    }

    /// The InfoNCE's queries and keys over the GLOBAL batch: every rank's rows in rank order
    /// (which is the global batch's order), this rank's with their gradient, the others' detached.
    /// In-batch negatives then do not depend on the world size. One process: `q` and `k`.
    fn global_pairs(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.group.world_size() == 1 {
            return Ok((q.shallow_clone(), k.shallow_clone()));
        }
        let rank = self.group.rank();
        let mut qs = self.group.all_gather(&q.detach())?;
        let mut ks = self.group.all_gather(&k.detach())?;
        qs[rank] = q.shallow_clone();
        ks[rank] = k.shallow_clone();
        Ok((Tensor::cat(&qs, 0), Tensor::cat(&ks, 0)))
    }

    /// Writes the last training batch's entries (after the optimizer step). Collective: every
    /// rank calls it after the same number of forward passes. One write per forward pass (a
    /// micro-batch), in order: every rank's entries of micro-batch m land, in rank order, before
    /// any of micro-batch m + 1, so the ring's slots follow the global batches' order at any
    /// world size and accumulation. Entries with a non-finite key or value are dropped here
    /// (with a warning) rather than failing one rank alone. One host read for the whole step (the
    /// counts of entries to drop), and none more unless some are.
    pub fn commit(&self) -> Result<()> {
        let mut pending = std::mem::take(&mut *self.pending()?);
        if pending.is_empty() {
            if self.group.world_size() == 1 {
                return Ok(());
            }
            // A rank with nothing to write still takes part in the (collective) write.
            let (d_k, d_v) = self.store()?.dims();
            let device = self.w_k.ws.device();
            pending.push((
                Tensor::zeros([0, d_k], (Kind::Float, device)),
                Tensor::zeros([0, d_v], (Kind::Float, device)),
                Tensor::zeros([0], (Kind::Int64, device)),
            ));
        }
        // Which entries may be written, for every micro-batch, counted in one read.
        let keep: Vec<(Tensor, Tensor)> = pending
            .iter()
            .map(|(k, v, ids)| writable(k, v, ids))
            .collect();
        let counts: Vec<Tensor> = keep
            .iter()
            .flat_map(|(finite, keep)| {
                [
                    finite.logical_not().sum(Kind::Int64),
                    keep.logical_not().sum(Kind::Int64),
                ]
            })
            .collect();
        let counts = crate::host::i64s(&Tensor::stack(&counts, 0))?;
        let n_bad: i64 = counts.iter().step_by(2).sum();
        if n_bad > 0 {
            tracing::warn!(
                entries = n_bad,
                "memory entries with NaN or infinite keys or values dropped"
            );
        }
        for (((k, v, ids), (_, keep)), dropped) in pending
            .into_iter()
            .zip(keep)
            .zip(counts.chunks(2).map(|c| c[1]))
        {
            let (k, v, ids) = if dropped == 0 {
                (k, v, ids)
            } else {
                let keep = keep.nonzero().squeeze_dim(1);
                (
                    k.index_select(0, &keep),
                    v.index_select(0, &keep),
                    ids.index_select(0, &keep),
                )
            };
            self.store()?.write(self.group.as_ref(), &k, &v, &ids)?;
        }
        Ok(())
    }
}

/// `(finite, keep)` `(n,)` bool of one micro-batch's entries: finite keys and values, and of
/// those the ones that may be written (not padding: negative example ids, a rank past the end of
/// a corpus). The others are dropped, the non-finite ones with a warning.
fn writable(k: &Tensor, v: &Tensor, ids: &Tensor) -> (Tensor, Tensor) {
    let finite = k
        .isfinite()
        .all_dim(1, false)
        .logical_and(&v.to_kind(Kind::Float).isfinite().all_dim(1, false)); // (n,)
    let keep = finite.logical_and(&ids.ge(0));
    (finite, keep)
}
