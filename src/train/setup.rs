//! What every command that builds a task model does first, in one place (torchtune's recipe
//! split: setup, loop, finish): the model reference resolved once (its files, tokenizer and
//! architecture; a download happens once per node), the data read with that tokenizer (the head's
//! size is its label count), and the model built on the run context's device. `train`, `memory
//! build`, a saved run's restore and the benches share it.
use crate::config::Config;
use crate::data::dataset::{load_data, Data};
use crate::dist::RunContext;
use crate::error::Result;
use crate::models::resolve::ModelRef;
use crate::task::TaskModel;

pub struct Setup {
    pub data: Data,
    pub model: TaskModel,
}

impl Setup {
    /// The dataset `cfg.data` names and the model for its labels.
    pub fn new(cfg: &Config, ctx: &RunContext) -> Result<Setup> {
        let model_ref = resolve(cfg, ctx)?;
        set_precision(cfg, ctx);
        let data = load_data(cfg, model_ref.tokenizer()?)?;
        let model = TaskModel::build_from(cfg, model_ref, data.label_names.len(), ctx)?;
        Ok(Setup { data, model })
    }
}

/// The model for `num_labels` classes without reading data (a saved run's labels, the benches).
pub fn build_model(cfg: &Config, ctx: &RunContext, num_labels: usize) -> Result<TaskModel> {
    set_precision(cfg, ctx);
    TaskModel::build_from(cfg, resolve(cfg, ctx)?, num_labels, ctx)
}

/// The process-wide matmul precision `train.tf32` asks for, on CUDA.
fn set_precision(cfg: &Config, ctx: &RunContext) {
    if ctx.device.is_cuda() {
        crate::ffi::optim::set_allow_tf32(cfg.train.tf32);
    }
}

/// `model.source` resolved, local rank 0 first (so that a hub download happens once per node).
fn resolve(cfg: &Config, ctx: &RunContext) -> Result<ModelRef> {
    ctx.local_rank_zero_first(|| ModelRef::resolve(&cfg.model.source))
}
