//! The `umtune bench-*` commands: each times one thing the way the `bench/` scripts compare
//! against their reference, and returns the figures as one JSON object per measurement (the
//! command line prints them, one line each).
mod memory_read;
mod optimizer;
pub use memory_read::{memory_read, MemoryReadArgs};
pub use optimizer::{optimizer, OptimizerArgs};

use crate::config::Config;
use crate::data::dataset::ids;
use crate::dist::RunContext;
use crate::error::{Error, Result};
use crate::ffi::streams;
use crate::models::{resolve, NoHook};
use crate::task::TaskModel;
use crate::train::checkpoint;
use crate::train::optimizer::AdamW;
use crate::train::setup::build_model;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What the model benchmarks take: the model's config, and the timing.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    #[command(flatten)]
    pub cfg: crate::config::ConfigArgs,
    #[command(flatten)]
    pub timing: Timing,
}

/// `umtune bench-collective`'s arguments.
#[derive(clap::Args, Debug)]
pub struct CollectiveArgs {
    /// Buffer sizes in MB.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub sizes_mb: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
}

/// `umtune bench-memory`'s arguments.
#[derive(clap::Args, Debug)]
pub struct MemoryArgs {
    #[arg(long)]
    pub vectors: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub k: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// libtorch threads (0: its default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The shape of the timed work and how often to repeat it, as every model bench takes it.
#[derive(clap::Args, Debug, Clone)]
pub struct Timing {
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    #[arg(long, default_value_t = 128)]
    pub seq_len: i64,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
}

impl Timing {
    /// Runs `f` `warmup` times, then `iters` timed times (synchronizing CUDA after each), and
    /// returns the median seconds, as the bench/ scripts take it for the reference.
    pub fn median_secs(&self, device: Device, f: impl FnMut() -> Result<()>) -> Result<f64> {
        median_secs(device, self.iters, self.warmup, f)
    }
}

/// Runs `f` `warmup` times, then `iters` timed times (synchronizing CUDA after each); the median.
fn median_secs(
    device: Device,
    iters: usize,
    warmup: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    if iters == 0 {
        return Err(Error::Config("--iters must be at least 1".into()));
    }
    let mut timed = || -> Result<f64> {
        let start = Instant::now();
        f()?;
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        Ok(start.elapsed().as_secs_f64())
    };
    for _ in 0..warmup {
        timed()?;
    }
    let times: Vec<f64> = (0..iters).map(|_| timed()).collect::<Result<_>>()?;
    Ok(median(times))
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2.0
    }
}

/// Fills the memory's ring with random unit keys and values (a long run's steady state: every
/// read scans `capacity` entries).
fn fill_memory(task: &TaskModel, cfg: &Config, ctx: &RunContext) -> Result<()> {
    if let Some(m) = &task.memory {
        let device = ctx.device;
        let n = m.store()?.capacity() as i64;
        let d = task.backbone.arch().hidden_size() as i64;
        let keys = Tensor::randn([n, cfg.memory.key_size], (Kind::Float, device));
        let keys = &keys / keys.norm_scalaropt_dim(2.0, [-1], true);
        let values = Tensor::randn([n, d], (Kind::Float, device));
        let ids = Tensor::arange_start(ids::SYNTHETIC, ids::SYNTHETIC + n, (Kind::Int64, device));
        m.store()?.write(ctx.group.as_ref(), &keys, &values, &ids)?;
        tracing::info!(entries = m.store()?.len(), "memory prefilled");
    }
    Ok(())
}

/// LoRA training steps (forward, backward, AdamW, memory commit) on random tokens with a
/// 2-class head; with `memory.enabled` the ring is full first.
pub fn train(cfg: &Config, timing: &Timing) -> Result<Value> {
    let ctx = RunContext::single(cfg)?;
    let device = ctx.device;
    let task = build_model(cfg, &ctx, 2)?;
    let mut opt = AdamW::new(task.named_trainable(), cfg.train.weight_decay);
    let vocab = task.backbone.arch().vocab_size() as i64;
    let (b_sz, seq_len) = (timing.batch, timing.seq_len);
    let tokens = Tensor::randint(vocab, [b_sz, seq_len], (Kind::Int64, device));
    let mask = Tensor::ones([b_sz, seq_len], (Kind::Int64, device));
    let labels = Tensor::randint(2, [b_sz], (Kind::Int64, device));
    fill_memory(&task, cfg, &ctx)?;
    task.training.set(true);
    // Fresh example ids each step, as training has: the memory's self-exclusion then removes
    // nothing, and every read scans a ring that fills up as in training.
    let mut next_id = 0;
    let secs = timing.median_secs(device, || {
        let example_ids = Tensor::arange_start(next_id, next_id + b_sz, (Kind::Int64, device));
        // The trainer's per-example random streams (activation checkpointing replays them).
        let keys = (0..b_sz as usize)
            .map(|i| streams::example_key(cfg.run.seed, next_id as usize, 0, i))
            .collect();
        next_id += b_sz;
        opt.zero_grad();
        // The loss stays on the device: the step has no host read besides the memory's.
        let _loss = streams::with_streams(keys, || {
            task.forward_backward(&tokens, &mask, Some(&example_ids), &labels, None, 1.0)
        })?;
        opt.step(cfg.train.lr);
        task.commit_memory()?;
        Ok(())
    })?;
    // On a GPU, the allocator's peak over the whole run (weights included), as PyTorch reports it.
    let cuda_peak = match device {
        tch::Device::Cuda(i) => Some(crate::ffi::cuda_peak_allocated(i).map_err(Error::Internal)?),
        _ => None,
    };
    Ok(json!({
        "model": cfg.model.source, "dtype": cfg.model.dtype.as_str(), "batch": b_sz,
        "seq_len": seq_len, "threads": tch::get_num_threads(),
        "trainable": task.trainable_params(), "secs_per_step": secs,
        "activation_checkpointing": cfg.train.activation_checkpointing.0,
        "quantize": cfg.model.quantize.as_str(), "cuda_peak_allocated": cuda_peak,
    }))
}

/// Saving and loading a checkpoint (model, AdamW state, a full memory) into `out`.
pub fn checkpoint(cfg: &Config, timing: &Timing, out: &Path) -> Result<Value> {
    let ctx = RunContext::single(cfg)?;
    let task = build_model(cfg, &ctx, 2)?;
    fill_memory(&task, cfg, &ctx)?;
    let mut opt = AdamW::new(task.named_trainable(), cfg.train.weight_decay);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let loop_state = checkpoint::LoopState::default();
    let snap = checkpoint::Snapshot {
        step: 1,
        total_steps: 1,
        sampler: Default::default(),
        global_batch: cfg.train.batch_size,
        loop_state: &loop_state,
        validation: None,
    };
    let mut dir = PathBuf::new();
    let save_s = timing.median_secs(ctx.device, || {
        dir = checkpoint::save(out, cfg, &ctx, &task, &opt, &snap)?;
        Ok(())
    })?;
    // What every rank of a resume does: the manifest, then each file checked while it is
    // copied into the model, AdamW and the memory.
    let load_s = timing.median_secs(ctx.device, || {
        let manifest = checkpoint::manifest_of(&dir)?;
        checkpoint::restore(&dir, &manifest, &task, &mut opt)
    })?;
    // What rank 0 adds when it chooses the checkpoint (so that `--resume auto` can fall back
    // to an older one): the manifest's files' checksums.
    let verify_s = timing.median_secs(ctx.device, || checkpoint::verify(&dir).map(|_| ()))?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        bytes += entry
            .metadata()
            .map_err(|e| Error::io(entry.path(), e))?
            .len();
    }
    Ok(json!({
        "model": cfg.model.source, "checkpoint": dir, "bytes": bytes,
        "save_s": save_s, "load_s": load_s, "verify_s": verify_s,
        "threads": tch::get_num_threads(),
    }))
}

/// Forward passes of the backbone and its LM head (tokens/s).
pub fn forward(cfg: &Config, timing: &Timing) -> Result<Value> {
    let device = cfg.model.device.device(0)?;
    let loaded = resolve::load(&cfg.model.source, cfg.model.dtype.kind(), device)?;
    tracing::info!(model = %cfg.model.source, parameters = loaded.backbone.num_parameters(), "loaded");
    let vocab = loaded.backbone.arch().vocab_size() as i64;
    let (b_sz, seq_len) = (timing.batch, timing.seq_len);
    let tokens = Tensor::randint(vocab, [b_sz, seq_len], (Kind::Int64, device));
    let _guard = tch::no_grad_guard();
    let secs = timing.median_secs(device, || {
        let h = loaded.backbone.forward(&tokens, None, None, &mut NoHook);
        drop(loaded.backbone.lm_logits(&h));
        Ok(())
    })?;
    Ok(json!({
        "model": cfg.model.source, "dtype": cfg.model.dtype.as_str(), "batch": b_sz,
        "seq_len": seq_len, "threads": tch::get_num_threads(), "secs_per_iter": secs,
        "tokens_per_s": (b_sz * seq_len) as f64 / secs,
    }))
}

/// All-reduces of f32 buffers of each size through the CPU ring of the job this process is a
/// rank of (median seconds and bus bandwidth, 2(W-1)/W * bytes / time as nccl-tests count it);
/// rank 0 gets the figures, the other ranks an empty list.
pub fn collective(args: &CollectiveArgs) -> Result<Vec<Value>> {
    let job = crate::dist::env::JobEnv::from_process()?;
    let mut cfg = Config::default();
    cfg.model.device = crate::config::DeviceSpec::Cpu;
    cfg.run.threads = 1;
    let ctx = RunContext::for_job(&cfg, &job)?;
    let lines = ring_all_reduces(&ctx, args)?;
    ctx.finish()?;
    Ok(lines)
}

fn ring_all_reduces(ctx: &RunContext, args: &CollectiveArgs) -> Result<Vec<Value>> {
    let w = ctx.world_size as f64;
    let mut lines = Vec::new();
    for &mb in &args.sizes_mb {
        let n = (mb << 20) / 4;
        let mut t = Tensor::ones([n as i64], (Kind::Float, Device::Cpu));
        ctx.group.all_reduce_sum(&mut t)?; // warm-up (connections, pages)
        let mut times = Vec::new();
        for _ in 0..args.iters.max(1) {
            ctx.group.barrier()?;
            let start = Instant::now();
            ctx.group.all_reduce_sum(&mut t)?;
            times.push(start.elapsed().as_secs_f64());
        }
        let secs = median(times);
        let bytes = (n * 4) as f64;
        if ctx.is_writer {
            lines.push(json!({
                "backend": "umtune-ring", "world_size": ctx.world_size, "mb": mb,
                "secs": secs, "bus_gbps": 2.0 * (w - 1.0) / w * bytes / secs / 1e9,
            }));
        }
    }
    Ok(lines)
}

/// Exact top-k reads of the external memory: keys and queries from a safetensors file
/// (`keys (n, d)`, `queries (q, d)`); `out` receives the slots found.
pub fn memory(args: &MemoryArgs) -> Result<Value> {
    use crate::dist::SingleProcess;
    use crate::memory::ShardedKvMemory;
    let (vectors, k) = (args.vectors.as_path(), args.k);
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let cpu = Device::Cpu;
    let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(vectors)
        .map_err(|e| Error::format(vectors, e.to_string()))?
        .into_iter()
        .collect();
    let get = |name: &str| {
        tensors
            .get(name)
            .map(|t| t.to_kind(Kind::Float))
            .ok_or_else(|| Error::format(vectors, format!("no tensor `{name}`")))
    };
    let (keys, queries) = (get("keys")?, get("queries")?);
    let (n, d) = keys.size2()?;
    let q = queries.size()[0];
    // Values do not take part in the search; one column keeps the memory small.
    let mut memory = ShardedKvMemory::new(
        &crate::config::MemoryConfig {
            capacity: n as usize,
            key_size: d,
            tau: 1.0,
            ..Default::default()
        },
        1,
        0,
        1,
        cpu,
    );
    let chunk = 65536;
    for start in (0..n).step_by(chunk as usize) {
        let len = chunk.min(n - start);
        let slot_ids = Tensor::arange_start(start, start + len, (Kind::Int64, cpu));
        let values = Tensor::zeros([len, 1], (Kind::Float, cpu));
        memory.write(
            &SingleProcess,
            &keys.narrow(0, start, len),
            &values,
            &slot_ids,
        )?;
    }
    let query_ids = Tensor::full([q], ids::NONE, (Kind::Int64, cpu));
    let _guard = tch::no_grad_guard();
    let mut found = None;
    let secs = median_secs(cpu, args.iters, 1, || {
        found = Some(memory.search_local(&queries, &query_ids, k)?.slots);
        Ok(())
    })?;
    if let (Some(path), Some(slots)) = (&args.out, found) {
        Tensor::write_safetensors(&[("slots", slots)], path)?;
    }
    Ok(json!({"entries": n, "queries": q, "dim": d, "k": k,
        "threads": tch::get_num_threads(), "secs_per_batch": secs,
        "queries_per_s": q as f64 / secs}))
}
