//! `umtune memory build`: a memory prebuilt from a corpus in one pass (METHOD.md section 2), from
//! a trained run (its `W_k`; the file replaces the run's memory, which `eval` and `predict` then
//! read) or from a config (a fresh model's `W_k`, saved in the file; a run starts from the file
//! with `memory.prebuilt` and takes that `W_k` with it). Entries are written in corpus order, so when the corpus is
//! larger than the ring the last `capacity` entries are the ones kept, as in training.
use super::run_dir::load_run;
use super::trainer::{load_data, save_memory, TaskModel};
use crate::config::Config;
use crate::data::batching::collate;
use crate::error::{Error, Result};
use crate::models::resolve::load_tokenizer;
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

/// Ids of entries from another dataset than the source's own start at 3 * 2^40, past the train,
/// validation and test ranges, so self-exclusion never mistakes them for the run's examples.
const FOREIGN_IDS: i64 = 3 << 40;

/// Points `cfg` at `data` if given; whether that is another dataset than the source's own.
fn retarget(cfg: &mut Config, data: Option<&str>) -> bool {
    match data {
        Some(d) if d != cfg.data.dataset => {
            cfg.data.dataset = d.to_string();
            true
        }
        _ => false,
    }
}

pub fn build(req: &BuildRequest) -> Result<BuildReport> {
    let start = Instant::now();
    let is_run = req.source.join("summary.json").is_file();
    let (model, config, data, out, foreign) = if is_run {
        let mut run = load_run(req.source, req.overrides)?;
        let foreign = retarget(&mut run.config, req.data);
        let data = load_data(&run.config, run.model.tokenizer()?)?;
        let out = req
            .out
            .map_or_else(|| req.source.join("memory.safetensors"), Path::to_path_buf);
        (run.model, run.config, data, out, foreign)
    } else if req.source.is_file() {
        let mut cfg = Config::load(Some(req.source), req.overrides)?;
        let foreign = retarget(&mut cfg, req.data);
        let out = req.out.ok_or_else(|| {
            Error::Config(format!(
                "memory build {}: --out FILE is required when building from a config",
                req.source.display()
            ))
        })?;
        if cfg.run.threads > 0 {
            tch::set_num_threads(cfg.run.threads as i32);
        }
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
        let (model, _) = TaskModel::build(&cfg, data.label_names.len())?;
        (model, cfg, data, out.to_path_buf(), foreign)
    } else {
        return Err(Error::Config(format!(
            "memory build {}: neither a run directory (with summary.json) nor a config file",
            req.source.display()
        )));
    };
    let fusion = model.memory.as_ref().ok_or_else(|| {
        Error::Config(format!(
            "memory build {}: memory.enabled is false, there is no memory to build",
            req.source.display()
        ))
    })?;
    let examples = match req.split {
        "train" => data.train,
        "validation" => data.validation,
        "test" => data.test.ok_or_else(|| {
            Error::Config(format!(
                "dataset `{}` has no test split",
                config.data.dataset
            ))
        })?,
        other => {
            return Err(Error::Config(format!(
                "--split {other}: expected train, validation or test"
            )))
        }
    };
    fusion.store()?.clear();
    model.training.set(false);
    let _g = tch::no_grad_guard();
    let pad = model.tokenizer()?.padding_id();
    let device = model.backbone.device();
    for chunk in examples.chunks(config.train.batch_size.max(1) * 2) {
        let items: Vec<_> = chunk.iter().collect();
        let batch = collate(&items, pad, device);
        let ids = if foreign {
            batch.example_ids + FOREIGN_IDS
        } else {
            batch.example_ids
        };
        model.record_memory(&batch.input_ids, &batch.attention_mask, &ids)?;
    }
    save_memory(fusion, &out)?;
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
