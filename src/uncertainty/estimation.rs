//! Feature-level uncertainty estimation with cross-layer propagation and training-time noise
//! (METHOD.md section 1), as a [`LayerHook`] between backbone blocks. At each block l in S:
//! `logvar_l = clamp(B_l(LN(h_l)) + c_l p_{l-1}, -10, 10)`, `p_l = rho_l p_{l-1} + (1 - rho_l)
//! exp(logvar_l)` with `rho_l = sigmoid(theta_l)`, and in training (or MC sampling at prediction)
//! `h_l += s sqrt(p_l) rms(h_l) eps` with each token's feature RMS detached (`uncertainty.relative`,
//! the default: p is a variance relative to the feature scale; otherwise the older absolute
//! `s sqrt(p_l) eps`; the reparameterization of Kendall & Gal 2017,
//! <https://arxiv.org/abs/1703.04977>). Parameters
//! are f32 under `uncertainty.blocks.{l}`; the estimate starts at exp(-4) everywhere (B's last
//! layer is zero with bias -4), so a fresh estimator changes nothing but the noise it adds.
use crate::config::UncertaintyConfig;
use crate::models::LayerHook;
use crate::probe::Probe;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The probe (and `summary.json` `um` key) of the noise's standard deviation over each token's
/// feature RMS, averaged over tokens: the scale of the noise UM trains with (`umtune report`
/// reports it per group).
pub const NOISE_TO_FEATURE: &str = "um.noise_to_feature";

struct BlockEstimator {
    layer: usize,
    norm: nn::LayerNorm,
    down: nn::Linear,
    up: nn::Linear,
    /// Weight of p_{l-1} in the estimate (absent at the first block, where p_{l-1} = 0).
    c: Option<Tensor>,
    theta: Tensor,
}

/// The estimators of every block in S, in block order.
pub struct FeatureUncertainty {
    blocks: Vec<BlockEstimator>,
    propagation: bool,
    noise_scale: f64,
    relative: bool,
    /// The regularizer's prior relative variance (the probes count the tokens away from it).
    prior_var: f64,
}

impl FeatureUncertainty {
    /// The first block with an estimator.
    pub fn first_layer(&self) -> Option<usize> {
        self.blocks.first().map(|b| b.layer)
    }

    /// `layers` are the blocks in S (sorted, distinct); `d` the hidden size.
    pub fn new(p: &nn::Path, layers: &[usize], d: i64, cfg: &UncertaintyConfig) -> Self {
        let blocks = layers
            .iter()
            .enumerate()
            .map(|(i, &layer)| {
                let b = p / "blocks" / layer;
                let up = nn::LinearConfig {
                    ws_init: nn::Init::Const(0.0),
                    bs_init: Some(nn::Init::Const(-4.0)),
                    bias: true,
                };
                BlockEstimator {
                    layer,
                    norm: nn::layer_norm(&b / "norm", vec![d], Default::default()),
                    down: nn::linear(&b / "down", d, cfg.rank, Default::default()),
                    up: nn::linear(&b / "up", cfg.rank, d, up),
                    c: (i > 0 && cfg.propagation).then(|| b.var("c", &[1], nn::Init::Const(1.0))),
                    theta: b.var("theta", &[1], nn::Init::Const(0.0)),
                }
            })
            .collect();
        FeatureUncertainty {
            blocks,
            propagation: cfg.propagation,
            noise_scale: if cfg.noise { cfg.noise_scale } else { 0.0 },
            relative: cfg.relative,
            prior_var: cfg.prior_var,
        }
    }

    /// A hook for one forward pass; it collects every block's p and, when `noisy` (training, or
    /// an MC sample at prediction), perturbs the hidden states.
    pub fn hook<'a>(&'a self, noisy: bool, probe: &'a Probe) -> UncertaintyHook<'a> {
        UncertaintyHook {
            module: self,
            noisy,
            next: 0,
            p: Vec::new(),
            probe,
        }
    }
}

/// The per-forward state: which estimator comes next and the p of the blocks passed.
pub struct UncertaintyHook<'a> {
    module: &'a FeatureUncertainty,
    noisy: bool,
    next: usize,
    /// `(b, t, d)` f32 variances p_l of each block in S, in order.
    pub p: Vec<Tensor>,
    probe: &'a Probe,
}

impl UncertaintyHook<'_> {
    /// p of block `layer`, if it carries an estimator and has been passed.
    pub fn p_at(&self, layer: usize) -> Option<&Tensor> {
        let i = self.module.blocks.iter().position(|b| b.layer == layer)?;
        self.p.get(i)
    }

    /// p of the last block in S (the one the head sees).
    pub fn last(&self) -> Option<&Tensor> {
        self.p.last()
    }
}

impl LayerHook for UncertaintyHook<'_> {
    fn after_block(&mut self, layer: usize, hidden: Tensor) -> Tensor {
        let Some(est) = self.module.blocks.get(self.next) else {
            return hidden;
        };
        if est.layer != layer {
            return hidden;
        }
        self.next += 1;
        let h = hidden.to_kind(Kind::Float);
        let u = est.norm.forward(&h);
        let mut logvar = est.up.forward(&est.down.forward(&u).gelu("none")); // (b, t, d)
        let prev = self.p.last();
        if let (Some(c), Some(prev)) = (&est.c, prev) {
            logvar += c * prev;
        }
        self.probe.range("um.logvar", &logvar);
        let v = logvar.clamp(-10.0, 10.0).exp();
        let rho = est.theta.sigmoid();
        let p: Tensor = match (self.module.propagation, prev) {
            (true, Some(prev)) => &rho * prev + (1.0 - &rho) * &v,
            _ => (1.0 - &rho) * &v,
        };
        self.probe.range("um.p", &p);
        if self.probe.is_on() {
            // Per block: the mean relative variance, and the share of tokens whose mean p moved
            // from the prior by more than a factor of 2 either way.
            let per_token = p.detach().mean_dim(-1, false, Kind::Float);
            let moved = (per_token / self.module.prior_var)
                .log()
                .abs()
                .gt(2f64.ln());
            self.probe
                .record(&format!("um.p_mean.{layer}"), || p.mean(Kind::Float));
            self.probe
                .record(&format!("um.moved_from_prior.{layer}"), || {
                    moved.to_kind(Kind::Float).mean(Kind::Float)
                });
        }
        let out = if self.module.noise_scale > 0.0 && self.noisy {
            let kind = hidden.kind();
            // Each token's feature RMS, detached: the scale the relative noise is measured in.
            let rms = || {
                h.detach()
                    .pow_tensor_scalar(2)
                    .mean_dim(-1, true, Kind::Float)
                    .sqrt()
            };
            let std = p.sqrt() * self.module.noise_scale;
            let std = if self.module.relative {
                std * rms()
            } else {
                std
            };
            if self.probe.is_on() {
                // The noise's standard deviation against each token's feature scale (RMS).
                let rel = (&std / rms().clamp_min(1e-12)).detach();
                self.probe
                    .record(NOISE_TO_FEATURE, || rel.mean(Kind::Float));
                self.probe.record("um.noise_to_feature_max", || rel.max());
            }
            let noise = std * crate::ffi::streams::randn(&p.size(), 0, &p);
            hidden + noise.to_kind(kind)
        } else {
            hidden
        };
        self.p.push(p);
        out
    }
}
