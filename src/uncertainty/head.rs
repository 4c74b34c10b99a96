//! Uncertainty at the head (METHOD.md section 1): noise suppression of the pooled features
//! `z / sqrt(1 + softplus(gamma) p_z)`, heteroscedastic logits `mu = W z`,
//! `s2 = (W * W) p_z + softplus(w_a . z + b_a)` trained with the sampled-softmax loss (mean over
//! `n_mc` samples of the cross-entropy of `mu + sqrt(s2) eps`, Kendall & Gal 2017), and the
//! uncertainty-conditioned temperature `T(x) = 1 + softplus(w_T mean(p_z) + b_T)` that divides the
//! logits. Parameters are f32 under `uncertainty.head`; each part has its own switch.
use crate::config::UncertaintyConfig;
use crate::heads::Head;
use tch::{nn, Kind, Tensor};

pub struct UncertainHead {
    /// Suppression strength (init -4.6: the factor starts within 1e-4 of 1).
    gamma: Option<Tensor>,
    /// Aleatoric variance `softplus(w_a . z + b_a)`.
    aleatoric: Option<(Tensor, Tensor)>,
    /// `(w_T, b_T)` of the conditioned temperature.
    temperature: Option<(Tensor, Tensor)>,
    n_mc: i64,
}

/// The head's outputs for one batch.
pub struct HeadOutput {
    /// Mean logits divided by T(x): what evaluation and prediction use. `(…, C)` f32.
    pub logits: Tensor,
    /// Logit variance `s2 / T(x)^2` when the head is heteroscedastic.
    pub variance: Option<Tensor>,
    /// `T(x) (…, 1)` when the temperature is conditioned.
    pub temperature: Option<Tensor>,
}

impl UncertainHead {
    pub fn new(p: &nn::Path, d: i64, cfg: &UncertaintyConfig) -> Self {
        let p = p / "head";
        UncertainHead {
            gamma: cfg
                .suppression
                .then(|| p.var("gamma", &[1], nn::Init::Const(-4.6))),
            aleatoric: cfg.heteroscedastic.then(|| {
                (
                    p.var("w_a", &[d], nn::Init::Const(0.0)),
                    p.var("b_a", &[1], nn::Init::Const(-4.0)),
                )
            }),
            temperature: cfg.conditioned_temperature.then(|| {
                (
                    p.var("w_t", &[1], nn::Init::Const(1.0)),
                    p.var("b_t", &[1], nn::Init::Const(-4.0)),
                )
            }),
            n_mc: cfg.n_mc,
        }
    }

    /// `z (…, d)` pooled features and `p_z (…, d)` their variances, both f32.
    pub fn forward(&self, head: &Head, z: &Tensor, p_z: &Tensor) -> HeadOutput {
        let z = match &self.gamma {
            Some(gamma) => z / ((gamma.softplus() * p_z) + 1.0).sqrt(),
            None => z.shallow_clone(),
        };
        let mu = head.project(&z);
        let variance = self.aleatoric.as_ref().map(|(w_a, b_a)| {
            let w = head.weight();
            let epistemic = p_z.linear::<&Tensor>(&(w * w), None); // (…, C)
            let aleatoric = (z.matmul(w_a).unsqueeze(-1) + b_a).softplus(); // (…, 1)
            epistemic + aleatoric
        });
        match &self.temperature {
            Some((w_t, b_t)) => {
                let t: Tensor = (w_t * p_z.mean_dim(-1, true, Kind::Float) + b_t).softplus() + 1.0; // (…, 1)
                HeadOutput {
                    logits: &mu / &t,
                    variance: variance.map(|s2| s2 / (&t * &t)),
                    temperature: Some(t),
                }
            }
            None => HeadOutput {
                logits: mu,
                variance,
                temperature: None,
            },
        }
    }

    /// Sampled logits `(n_mc, …, C)` for the sampled-softmax loss, or None when the head is not
    /// heteroscedastic.
    pub fn samples(&self, out: &HeadOutput) -> Option<Tensor> {
        Self::draw(out, self.n_mc)
    }

    /// `n` draws `(n, …, C)` of `mu + sqrt(s2) eps` (None without a variance).
    pub fn draw(out: &HeadOutput, n: i64) -> Option<Tensor> {
        let s2 = out.variance.as_ref()?;
        let mut shape = vec![n];
        shape.extend(out.logits.size());
        // Dimension 1 runs over the batch's examples.
        let eps = crate::ffi::streams::randn(&shape, 1, &out.logits);
        Some(out.logits.unsqueeze(0) + s2.sqrt().unsqueeze(0) * eps)
    }
}
