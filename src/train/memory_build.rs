//! `umtune memory build`: a memory prebuilt from a corpus in one pass (METHOD.md section 2), from
//! a trained run (its `W_k`; the file replaces the run's memory, which `eval` and `predict` then
//! read) or from a config (a fresh model's `W_k`, saved in the file; a run starts from the file
//! with `memory.prebuilt` and takes that `W_k` with it). Entries are written in corpus order, so when the corpus is
//! larger than the ring the last `capacity` entries are the ones kept, as in training. Under a
//! launcher every rank encodes a contiguous share of each global batch (corpus order is kept:
//! the memory appends the ranks' entries in rank order) and writes its own shard of the output
//! (see [`crate::memory::files`]); the result equals one process's.
use super::eval::for_each_batch;
use super::restore::load_run_in;
use super::run_dir::RunDir;
use super::run_files::MEMORY_INDEX;
use super::setup::Setup;
use crate::config::Config;
use crate::data::dataset::{ids, load_data};
use crate::dist::env::JobEnv;
use crate::dist::RunContext;
use crate::error::{Error, Result};
use crate::memory::files::index_path;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `memory build` reads and writes.
pub struct BuildRequest<'a> {
    /// A run directory (with `summary.json`) or a TOML config.
    pub source: &'a Path,
    /// A dataset to read instead of the source's.
    pub data: Option<&'a str>,
    /// `train`, `validation` or `test`.
    pub split: &'a str,
    /// Where to write (the memory's index, `NAME.index.json`; `NAME` alone gets the suffix);
    /// defaults to the run's `memory.index.json` (required for a config).
    pub out: Option<&'a Path>,
    /// `section.key=value` config overrides.
    pub overrides: &'a [String],
}

#[derive(Debug, serde::Serialize)]
pub struct BuildReport {
    pub out: PathBuf,
    pub dataset: String,
    pub split: String,
    pub examples: usize,
    /// Entries the memory holds (examples, or tokens for NER, up to the capacity).
    pub entries: usize,
    pub bytes: usize,
    pub seconds: f64,
}

/// Points `cfg` at `data` if given; whether that is another dataset than the source's own. A
/// foreign corpus keeps its own labels: the memory stores hidden states, not labels.
fn retarget(cfg: &mut Config, data: Option<&str>) -> bool {
    match data {
        Some(d) if d != cfg.data.dataset => {
            cfg.data.dataset = d.to_string();
            cfg.data.label_names.clear();
            true
        }
        _ => false,
    }
}

/// Builds the memory in this process alone.
pub fn build(req: &BuildRequest) -> Result<BuildReport> {
    build_in(req, &JobEnv::single())
}

/// `umtune memory build`'s arguments.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// A run directory or a TOML config with `[memory] enabled = true`.
    pub source: std::path::PathBuf,
    /// A dataset (name or directory) to read instead of the source's.
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long, default_value = "train")]
    pub split: String,
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub overrides: crate::config::OverrideArgs,
}

impl BuildArgs {
    pub fn request(&self) -> BuildRequest<'_> {
        BuildRequest {
            source: &self.source,
            data: self.data.as_deref(),
            split: &self.split,
            out: self.out.as_deref(),
            overrides: &self.overrides.set,
        }
    }
}

/// Builds the memory with every process of `job` (each encodes its share and writes its shard).
pub fn build_in(req: &BuildRequest, job: &JobEnv) -> Result<BuildReport> {
    let start = Instant::now();
    let is_run = req.source.is_dir();
    let (model, config, data, out, foreign, ctx) = if is_run {
        let mut run = load_run_in(req.source, req.overrides, job)?;
        let foreign = retarget(&mut run.config, req.data);
        let data = load_data(&run.config, run.model.tokenizer()?)?;
        (
            run.model,
            run.config,
            data,
            req.out.map(Path::to_path_buf),
            foreign,
            run.ctx,
        )
    } else if req.source.is_file() {
        let mut cfg = Config::load(Some(req.source), req.overrides)?;
        let foreign = retarget(&mut cfg, req.data);
        let out = req.out.ok_or_else(|| {
            Error::Config(format!(
                "memory build {}: --out FILE is required when building from a config",
                req.source.display()
            ))
        })?;
        let ctx = match job.world_size {
            1 => RunContext::single(&cfg)?,
            _ => RunContext::for_job(&cfg, job)?,
        };
        // W_k is saved with the entries, so a run that starts from them queries the same keys
        // whatever its own initialization (or head size).
        let Setup { data, model } = Setup::new(&cfg, &ctx)?;
        (model, cfg, data, Some(out.to_path_buf()), foreign, ctx)
    } else {
        return Err(Error::Config(format!(
            "memory build {}: neither a run directory nor a config file",
            req.source.display()
        )));
    };
    let fusion = model.memory.as_ref().ok_or_else(|| {
        Error::Config(format!(
            "memory build {}: memory.enabled is false, there is no memory to build",
            req.source.display()
        ))
    })?;
    let examples = data.split(req.split)?;
    fusion.store()?.clear();
    let offset = if foreign { ids::FOREIGN } else { 0 };
    // Global batches in corpus order, rank r encoding the r-th share of each, so the ring keeps
    // the last `capacity` entries as training would. A rank past the corpus's end encodes the
    // batch's first example as padding (id -1: read, never written) — the writes and reads are
    // collective.
    let (rank, w) = (ctx.rank, ctx.world_size);
    let bs = config.train.eval_batch_size();
    for start in (0..examples.len()).step_by(bs * w) {
        let end = (start + bs * w).min(examples.len());
        let lo = (start + rank * bs).min(end);
        let hi = (lo + bs).min(end);
        let (share, padding) = match lo < hi {
            true => (&examples[lo..hi], false),
            false => (&examples[start..start + 1], true),
        };
        for_each_batch(&model, share, bs, false, |_, batch| {
            let ids = match padding {
                true => batch.example_ids.full_like(-1),
                false => &batch.example_ids + offset,
            };
            model.record_memory(&batch.input_ids, &batch.attention_mask, &ids)
        })?;
    }
    let out = match out {
        Some(path) => {
            fusion.save(&path, true)?;
            index_path(&path)
        }
        // The run's own memory, with its digest in run.json.
        None => {
            // Only the writer rank holds the run's lock (every rank writes its shard).
            let mut run = match ctx.is_writer {
                true => RunDir::open_for_writing(req.source)?,
                false => RunDir::open(req.source)?,
            };
            run.set_writer(ctx.is_writer);
            run.save_memory(fusion)?;
            req.source.join(MEMORY_INDEX)
        }
    };
    let store = fusion.store()?;
    ctx.finish()?;
    Ok(BuildReport {
        out,
        dataset: config.data.dataset.clone(),
        split: req.split.to_string(),
        examples: examples.len(),
        entries: store.len(),
        bytes: store.bytes(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
