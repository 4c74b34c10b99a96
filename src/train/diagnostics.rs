//! Training diagnostics, so that a user can see why a run went wrong: the gradient norm of each
//! part of the model (LoRA, head, UM estimators, UM head, memory W_q/W_k/gate/W_o), probes of the
//! quantities that can blow up (recorded by the forward pass on logged steps, see
//! [`crate::probe::Probe`]),
//! and the divergence guard: a loss or gradient-norm spike far above its running average is
//! logged as a warning that names the part whose gradient rose the most.
use std::collections::BTreeMap;

/// The part of the model a trainable tensor belongs to, by its name.
pub fn part_of(name: &str) -> &'static str {
    if name.contains("lora_") {
        "lora"
    } else if name.starts_with("uncertainty.blocks") {
        "um_estimators"
    } else if name.starts_with("uncertainty.head") {
        "um_head"
    } else if name.starts_with("memory.w_q") {
        "memory_w_q"
    } else if name.starts_with("memory.w_k") {
        "memory_w_k"
    } else if name.starts_with("memory.w_g") {
        "memory_gate"
    } else if name.starts_with("memory.w_o") {
        "memory_w_o"
    } else if name.starts_with("score") || name.starts_with("classifier") {
        "head"
    } else {
        "adapters"
    }
}

/// A spike the guard saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Spike {
    pub step: usize,
    pub loss: f64,
    pub loss_avg: f64,
    pub grad_norm: f64,
    pub grad_norm_avg: f64,
    /// The part whose gradient norm rose the most against its own running average.
    pub part: String,
    pub part_norm: f64,
    pub part_avg: f64,
}

/// Running averages (exponential, over about the last ten steps) of the loss, the gradient norm
/// and each part's gradient norm. After [`WARMUP`] steps, a step is a spike when its loss is more
/// than [`LOSS_FACTOR`] times the running loss (and at least 0.5 above it), or its gradient norm
/// more than [`NORM_FACTOR`] times the running norm.
#[derive(Default)]
pub struct SpikeGuard {
    seen: usize,
    loss: f64,
    grad_norm: f64,
    parts: BTreeMap<String, f64>,
}

pub const WARMUP: usize = 10;
pub const LOSS_FACTOR: f64 = 2.0;
pub const NORM_FACTOR: f64 = 5.0;
const DECAY: f64 = 0.9;

impl SpikeGuard {
    /// Takes one optimizer step's numbers (the gradient norms before clipping).
    pub fn observe(
        &mut self,
        step: usize,
        loss: f64,
        grad_norm: f64,
        parts: &BTreeMap<String, f64>,
    ) -> Option<Spike> {
        let spike = (self.seen >= WARMUP
            && ((loss > LOSS_FACTOR * self.loss && loss > self.loss + 0.5)
                || grad_norm > NORM_FACTOR * self.grad_norm))
            .then(|| {
                let (part, part_norm, part_avg) = parts
                    .iter()
                    .map(|(p, &n)| (p, n, self.parts.get(p).copied().unwrap_or(n)))
                    .max_by(|a, b| (a.1 / a.2.max(1e-12)).total_cmp(&(b.1 / b.2.max(1e-12))))
                    .map(|(p, n, a)| (p.clone(), n, a))
                    .unwrap_or_default();
                Spike {
                    step,
                    loss,
                    loss_avg: self.loss,
                    grad_norm,
                    grad_norm_avg: self.grad_norm,
                    part,
                    part_norm,
                    part_avg,
                }
            });
        let mix = |avg: f64, x: f64, first: bool| {
            if first {
                x
            } else {
                DECAY * avg + (1.0 - DECAY) * x
            }
        };
        let first = self.seen == 0;
        self.loss = mix(self.loss, loss, first);
        self.grad_norm = mix(self.grad_norm, grad_norm, first);
        for (p, &n) in parts {
            let avg = self.parts.get(p).copied();
            self.parts
                .insert(p.clone(), avg.map_or(n, |a| mix(a, n, false)));
        }
        self.seen += 1;
        spike
    }
}
