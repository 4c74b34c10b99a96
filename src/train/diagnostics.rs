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
    /// The part whose gradient norm rose the most: its fast running average against its slow one.
    pub part: String,
    pub part_norm: f64,
    pub part_avg: f64,
}

/// The guard's memory: slow running averages (exponential, about the last 100 steps) of the loss,
/// its spread, the gradient norm and each part's gradient norm, and fast ones (about the last 5
/// steps) of the loss and the parts. After [`WARMUP`] steps a step is a spike when
/// - the fast loss average has risen to more than [`LOSS_RISE`] times the slow one (and 0.3 above
///   it): a sustained climb, as when a run starts to collapse; or
/// - the step's loss is more than 6 standard deviations (and 0.5) above the slow average, and
///   more than twice it: one extreme batch; or
/// - the gradient norm is more than [`NORM_FACTOR`] times its slow average.
///
/// Ordinary batch-to-batch noise (a small batch's loss easily doubles) is none of these. After
/// a warning the guard stays quiet for [`COOLDOWN`] steps.
/// Its state is part of a checkpoint (so a resumed run warns where the uninterrupted one did).
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct SpikeGuard {
    seen: usize,
    quiet_until: usize,
    loss_fast: f64,
    loss_slow: f64,
    loss_var: f64,
    norm_slow: f64,
    parts_fast: BTreeMap<String, f64>,
    parts_slow: BTreeMap<String, f64>,
}

pub const WARMUP: usize = 20;
pub const LOSS_RISE: f64 = 2.0;
pub const NORM_FACTOR: f64 = 8.0;
pub const COOLDOWN: usize = 10;
const FAST: f64 = 0.8;
const SLOW: f64 = 0.99;

fn ema(avg: f64, x: f64, decay: f64) -> f64 {
    decay * avg + (1.0 - decay) * x
}

impl SpikeGuard {
    /// Takes one optimizer step's numbers (the gradient norms before clipping).
    pub fn observe(
        &mut self,
        step: usize,
        loss: f64,
        grad_norm: f64,
        parts: &BTreeMap<String, f64>,
    ) -> Option<Spike> {
        // Slow averages start at zero and are bias-corrected (as Adam's moments), so the first
        // steps' high losses do not linger in them.
        let first = self.seen == 0;
        let correction = if first {
            1.0
        } else {
            1.0 - SLOW.powi(self.seen as i32)
        };
        let slow_of = |avg: f64, x: f64| if first { x } else { avg / correction };
        let slow = slow_of(self.loss_slow, loss);
        let spread = if first {
            0.0
        } else {
            (self.loss_var / correction).sqrt()
        };
        let norm_slow = slow_of(self.norm_slow, grad_norm);
        let loss_fast = if first {
            loss
        } else {
            ema(self.loss_fast, loss, FAST)
        };
        for (p, &n) in parts {
            let fast = self.parts_fast.get(p).map_or(n, |&a| ema(a, n, FAST));
            self.parts_fast.insert(p.clone(), fast);
        }
        let sustained = loss_fast > LOSS_RISE * slow && loss_fast > slow + 0.3;
        let extreme = loss > slow + (6.0 * spread).max(0.5) && loss > 2.0 * slow;
        let steep = grad_norm > NORM_FACTOR * norm_slow;
        let spike =
            (self.seen >= WARMUP && step >= self.quiet_until && (sustained || extreme || steep))
                .then(|| {
                    let eps = 1e-2 * norm_slow.max(1e-12);
                    let (part, part_norm, part_avg) = self
                        .parts_fast
                        .iter()
                        .map(|(p, &fast)| {
                            let avg = self.parts_slow.get(p).map_or(fast, |&a| a / correction);
                            (p, fast, avg)
                        })
                        .max_by(|a, b| {
                            ((a.1 + eps) / (a.2 + eps)).total_cmp(&((b.1 + eps) / (b.2 + eps)))
                        })
                        .map(|(p, n, a)| (p.clone(), n, a))
                        .unwrap_or_default();
                    Spike {
                        step,
                        loss,
                        loss_avg: slow,
                        grad_norm,
                        grad_norm_avg: norm_slow,
                        part,
                        part_norm,
                        part_avg,
                    }
                });
        if spike.is_some() {
            self.quiet_until = step + COOLDOWN;
        }
        self.loss_fast = loss_fast;
        self.loss_var = ema(self.loss_var, (loss - slow).powi(2), SLOW);
        self.loss_slow = ema(self.loss_slow, loss, SLOW);
        self.norm_slow = ema(self.norm_slow, grad_norm, SLOW);
        for (p, &n) in parts {
            let avg = self.parts_slow.get(p).copied().unwrap_or(0.0);
            self.parts_slow.insert(p.clone(), ema(avg, n, SLOW));
        }
        self.seen += 1;
        spike
    }
}
