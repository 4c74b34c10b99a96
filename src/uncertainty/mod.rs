//! Uncertainty (METHOD.md section 1): feature-level estimation with cross-layer propagation and
//! training-time noise, the uncertain head (suppression, heteroscedastic logits, conditioned
//! temperature), calibration metrics, post-hoc temperature scaling and their plots.
pub mod calibration;
pub mod estimation;
pub mod head;
pub mod metrics;
pub mod plots;

pub use calibration::fit_temperature;
pub use estimation::FeatureUncertainty;
pub use head::UncertainHead;
pub use metrics::{calibration_scores, CalibrationScores};

use crate::config::UncertaintyConfig;
use tch::nn;

/// The blocks that carry estimators: the configured ones, or the top 4.
pub fn plugin_layers(cfg: &UncertaintyConfig, num_layers: usize) -> Vec<usize> {
    let mut layers = if cfg.layers.is_empty() {
        (num_layers.saturating_sub(4)..num_layers).collect()
    } else {
        cfg.layers.clone()
    };
    layers.sort_unstable();
    layers.dedup();
    layers
}

/// Everything uncertainty modeling adds to a model.
pub struct Uncertainty {
    pub features: FeatureUncertainty,
    pub head: UncertainHead,
    pub lambda_var: f64,
    pub regularizer: crate::config::VarRegularizer,
    pub prior_var: f64,
}

impl Uncertainty {
    pub fn new(root: &nn::Path, cfg: &UncertaintyConfig, layers: &[usize], d: i64) -> Self {
        let p = root / "uncertainty";
        Uncertainty {
            features: FeatureUncertainty::new(&p, layers, d, cfg),
            head: UncertainHead::new(&p, d, cfg),
            lambda_var: cfg.lambda_var,
            regularizer: cfg.regularizer,
            prior_var: cfg.prior_var,
        }
    }

    /// The variance regularizer's per-token value of `p (…, d)`: the mean over features of the
    /// KL term `0.5 (p / p0 - log(p / p0) - 1)` or of p itself (`l1`), f32 `(…)`.
    pub fn per_token_penalty(&self, p: &tch::Tensor) -> tch::Tensor {
        let p = p.to_kind(tch::Kind::Float);
        let per_feature = match self.regularizer {
            crate::config::VarRegularizer::L1 => p,
            crate::config::VarRegularizer::Kl => {
                let ratio = p / self.prior_var;
                (&ratio - ratio.log() - 1.0) * 0.5
            }
        };
        if per_feature.dim() == 3 {
            per_feature.mean_dim(-1, false, tch::Kind::Float)
        } else {
            per_feature
        }
    }
}
