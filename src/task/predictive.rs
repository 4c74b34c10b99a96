//! What evaluation and prediction score: the deterministic logits, or the MC predictive
//! distribution of a run with uncertainty modeling. The blocks below the first plug-in (UM's
//! estimators, the memory) draw nothing at evaluation (adapter dropout is off), so their output
//! is the same in every MC pass: it is computed once and only the plugged blocks and the head run
//! per sample. With UM on the top 4 of 30 blocks (the default on SmolLM2-135M) 16 samples cost
//! 26 + 16 x 4 = 90 block passes instead of 480.
//!
//! Evaluation and prediction draw each example's MC noise from a stream of its own, keyed by the
//! run seed and the example's id ([`TaskModel::predictive_logits_of`]), so an example's MC
//! prediction does not depend on the batch it is scored in, its position there, or the rank that
//! scores it.
use super::model::{Entry, Pass, TaskModel};
use crate::error::Result;
use crate::ffi::streams;
use crate::models::attention::BatchMask;
use crate::models::NoHook;
use tch::{Kind, Tensor};

/// The `step` of [`streams::example_key`] that MC prediction keys its streams with: no training
/// step reaches it.
const MC_STEP: usize = usize::MAX;

impl TaskModel {
    /// [`Self::predictive_logits`] of a batch whose rows are the examples `ids` (their dataset
    /// ids, unique across splits): with MC sampling, each row's draws come from the stream of
    /// (run seed, id), so the MC prediction of an example is the same in any batch, order or
    /// rank (up to the float rounding of other padded shapes).
    pub fn predictive_logits_of(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: &Tensor,
        ids: &[i64],
    ) -> Result<Tensor> {
        let run = || self.predictive_logits(input_ids, mask, Some(example_ids));
        if self.mc_samples == 0 || self.um.is_none() {
            return run();
        }
        let keys = ids
            .iter()
            .map(|&id| streams::example_key(self.mc_seed, MC_STEP, 0, id as usize))
            .collect();
        streams::with_streams(keys, run)
    }

    /// The deterministic logits, or with `mc_samples > 0` (and uncertainty modeling) the log of
    /// the mean softmax over that many stochastic passes, each with the training-time feature
    /// noise and one draw of the heteroscedastic logits. Either way a softmax of the result gives
    /// the predictive probabilities. The MC passes share the unplugged blocks' output (see the
    /// module): the same numbers as [`Self::mc_sample_logits`] repeated, in fewer FLOPs.
    pub fn predictive_logits(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.mc_samples == 0 || self.um.is_none() {
            return Ok(self.forward(input_ids, mask, example_ids)?.logits);
        }
        let plugged = self.first_plugged_layer();
        // Prefix tuning extends every block's keys: no block is the backbone's alone.
        let shared = plugged > 0 && self.prefix.is_none() && !self.training.get();
        let batch = shared.then(|| BatchMask::new(input_ids, self.attention_mask(mask), None));
        let hidden = batch.as_ref().map(|batch| {
            self.in_autocast(|| {
                let x = self.backbone.embed(input_ids, batch);
                self.backbone.blocks(x, batch, 0..plugged, &mut NoHook)
            })
        });
        let entry = hidden
            .as_ref()
            .zip(batch.as_ref())
            .map(|(hidden, batch)| Entry {
                hidden,
                layer: plugged,
                batch,
            });
        let probs = (0..self.mc_samples)
            .map(|_| {
                let f = self.forward_with(
                    input_ids,
                    mask,
                    example_ids,
                    Pass::McSample,
                    entry.as_ref(),
                )?;
                Ok(f.logits.softmax(-1, Kind::Float))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        Ok(log_mean(&probs))
    }

    /// The logits of one stochastic pass through the whole model (feature noise and a draw of
    /// the heteroscedastic logits): what each of [`Self::predictive_logits`]'s samples computes.
    pub fn mc_sample_logits(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_with(input_ids, mask, example_ids, Pass::McSample, None)?
            .logits)
    }
}

/// `log(mean_i probs_i)`, `(n, …, C) -> (…, C)`, floored at the smallest normal f32 so a class
/// that no sample gives any mass stays finite.
pub fn log_mean(probs: &[Tensor]) -> Tensor {
    let mean = Tensor::stack(probs, 0).mean_dim(0, false, Kind::Float);
    mean.clamp_min(f64::from(f32::MIN_POSITIVE)).log()
}
