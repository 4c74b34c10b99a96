//! `umtune memory build`: a memory prebuilt from a corpus in one pass (METHOD.md section 2), from
//! a trained run (its `W_k`; the file replaces the run's memory, which `eval` and `predict` then
//! read) or from a config (a fresh model's `W_k`, saved in the file; a run starts from the file
//! with `memory.prebuilt` and takes that `W_k` with it). Entries are written in corpus order, so when the corpus is
//! larger than the ring the last `capacity` entries are the ones kept, as in training.
use super::eval::for_each_batch;
use super::restore::load_run;
use super::run_dir::{RunDir, MEMORY_FILE};
use crate::atomic_file::write_atomic_with;
use crate::config::Config;
use crate::data::dataset::{ids, load_data};
use crate::dist::RunContext;
use crate::error::{Error, Result};
use crate::models::resolve::load_tokenizer;
use crate::task::TaskModel;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

/// What `memory build` reads and writes.
pub struct BuildRequest<'a> {
    /// A run directory (with `summary.json`) or a TOML config.
    pub source: &'a Path,
    /// A dataset to read instead of the source's.
    pub data: Option<&'a str>,
    /// `train`, `validation` or `test`.
    pub split: &'a str,
    /// Where to write; defaults to the run's `memory.safetensors` (required for a config).
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

pub fn build(req: &BuildRequest) -> Result<BuildReport> {
    let start = Instant::now();
    let is_run = req.source.is_dir();
    let (model, config, data, out, foreign) = if is_run {
        let mut run = load_run(req.source, req.overrides)?;
        let foreign = retarget(&mut run.config, req.data);
        let data = load_data(&run.config, run.model.tokenizer()?)?;
        (
            run.model,
            run.config,
            data,
            req.out.map(Path::to_path_buf),
            foreign,
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
        let ctx = RunContext::single(&cfg)?;
        let tok = load_tokenizer(&cfg.model.source)?.ok_or_else(|| {
            Error::Config(format!(
                "model.source `{}` has no tokenizer",
                cfg.model.source
            ))
        })?;
        let data = load_data(&cfg, &tok)?;
        // W_k is saved with the entries, so a run that starts from them queries the same keys
        // whatever its own initialization (or head size).
        tch::manual_seed(cfg.run.seed as i64);
        let model = TaskModel::build(&cfg, data.label_names.len(), &ctx)?;
        (model, cfg, data, Some(out.to_path_buf()), foreign)
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
    // Corpus order, so the ring keeps the last `capacity` entries as training would.
    for_each_batch(
        &model,
        examples,
        config.train.batch_size * 2,
        false,
        |_, batch| {
            let ids = &batch.example_ids + offset;
            model.record_memory(&batch.input_ids, &batch.attention_mask, &ids)
        },
    )?;
    let out = match out {
        Some(path) => {
            let tensors = fusion.tensors()?;
            write_atomic_with(&path, |tmp| {
                Tensor::write_safetensors(&tensors, tmp)
                    .map_err(|e| Error::format(tmp, e.to_string()))
            })?;
            path
        }
        // The run's own memory file, with its digest in run.json.
        None => {
            RunDir::open(req.source)?.save_memory(fusion)?;
            req.source.join(MEMORY_FILE)
        }
    };
    let store = fusion.store()?;
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
