//! A run directory brought back to life for `eval`, `predict`, `export` and `memory build`: the
//! run's resolved config, its labels, and the model with its saved weights, checked against the
//! digests in `run.json` and for non-finite values. An unfinished run (interrupted, diverged,
//! killed) loads its last saved weights with a warning; one that saved none is refused.
use super::run_dir::RunDir;
use super::run_files::{read_calibration, RunState, CONFIG_FILE, TRAINABLE_FILE};
use super::setup::build_model;
use crate::config::Config;
use crate::dist::env::JobEnv;
use crate::dist::RunContext;
use crate::error::{Error, Result};
use crate::peft::load_named;
use crate::task::TaskModel;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub struct LoadedRun {
    pub dir: PathBuf,
    pub config: Config,
    pub label_names: Vec<String>,
    pub model: TaskModel,
    pub ctx: RunContext,
    /// False for a run that did not finish (its weights are from `weights_step`).
    pub finished: bool,
    pub weights_step: Option<usize>,
}

/// The run's resolved config with `overrides` applied; its labels become `data.label_names`, so
/// another dataset given with `data.dataset` is mapped onto them by name.
pub fn run_config(dir: &Path, overrides: &[String]) -> Result<Config> {
    config_of(&RunDir::open(dir)?, overrides)
}

fn config_of(run: &RunDir, overrides: &[String]) -> Result<Config> {
    let dir = run.path();
    // The run's own memory file supersedes the prebuilt one it may have started from.
    let file = dir.join(CONFIG_FILE);
    let mut overrides = [older_defaults(&file)?, overrides.to_vec()].concat();
    overrides.push("memory.prebuilt=".into());
    let mut config = Config::load(Some(&file), &overrides)?;
    config.data.label_names = run.record().label_names.clone();
    Ok(config)
}

/// Keys whose default changed what a run computes, with what runs did before them: a run whose
/// `config.toml` lacks one was trained that way and loads that way.
const CHANGED_DEFAULTS: &[(&str, &str, &str)] = &[
    ("uncertainty", "relative", "false"),
    ("uncertainty", "regularizer", "l1"),
];

/// `--set` overrides that give an older run's `config.toml` the [`CHANGED_DEFAULTS`] it lacks.
fn older_defaults(file: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let value: toml::Value =
        toml::from_str(&text).map_err(|e| Error::format(file, e.to_string()))?;
    Ok(CHANGED_DEFAULTS
        .iter()
        .filter(|(section, key, _)| value.get(section).and_then(|s| s.get(key)).is_none())
        .map(|(section, key, old)| format!("{section}.{key}={old}"))
        .collect())
}

/// The run in `dir` (see the module doc), in this process alone.
pub fn load_run(dir: &Path, overrides: &[String]) -> Result<LoadedRun> {
    load_run_in(dir, overrides, &JobEnv::single())
}

/// The run in `dir` loaded by every process of `job` (each holds its shard of the memory).
pub fn load_run_in(dir: &Path, overrides: &[String], job: &JobEnv) -> Result<LoadedRun> {
    let run = RunDir::open(dir)?;
    let record = run.record().clone();
    let config = config_of(&run, overrides)?;
    if record.state != RunState::Finished {
        let Some(step) = record
            .weights_step
            .filter(|_| dir.join(TRAINABLE_FILE).is_file())
        else {
            return Err(Error::run(
                dir,
                format!(
                    "the run is {} at step {} of {} and saved no weights yet (weights are saved at each evaluation, train.eval_every, and on SIGINT/SIGTERM)",
                    record.state.as_str(),
                    record.step,
                    record.total_steps
                ),
            ));
        };
        tracing::warn!(
            run = %dir.display(),
            state = record.state.as_str(),
            "the run did not finish: using its weights from step {step} of {}",
            record.total_steps
        );
    }
    let ctx = match job.world_size {
        1 => RunContext::single(&config)?,
        _ => RunContext::for_job(&config, job)?,
    };
    let mut model = build_model(&config, &ctx, record.label_names.len())?;
    let trainable = dir.join(TRAINABLE_FILE);
    load_named(
        model.trained_vars(),
        &trainable,
        run.recorded(TRAINABLE_FILE),
    )?;
    check_finite(&model.named_trainable(), &trainable)?;
    if let Some(m) = &model.memory {
        let name = run.memory_file();
        run.verify(name)?;
        let path = dir.join(name);
        m.load(&path, false)?;
        check_finite(&m.tensors()?, &path)?;
    }
    model.temperature = read_calibration(dir, record.weights_step)?;
    Ok(LoadedRun {
        dir: dir.to_path_buf(),
        config,
        label_names: record.label_names,
        model,
        ctx,
        finished: record.state == RunState::Finished,
        weights_step: record.weights_step,
    })
}

/// Fails naming the first tensor with a NaN or infinite value.
fn check_finite(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    for (name, t) in tensors {
        if t.is_floating_point() && !crate::host::bool_of(&t.isfinite().all()) {
            return Err(Error::tensor(
                path,
                name,
                "holds NaN or infinite values: these weights cannot give meaningful outputs",
            ));
        }
    }
    Ok(())
}
