//! AdamW (Loshchilov & Hutter 2019) with decoupled weight decay, as `torch.optim.AdamW` computes
//! it, with its state as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`, `step`) so that it can
//! be checkpointed. Written here because tch's optimizer keeps its state inside libtorch; the step
//! itself is ATen's fused AdamW kernel (`torch.optim.AdamW(fused=True)`), reached through the shim
//! (`ffi::optim`), and clipping uses the foreach norm and scale: no host sync, one launch per list.
use crate::ffi::optim::{self, AdamWStep};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// The gradient norms of one step, on the device: `values` is `(1 + groups,)` f32, the global
/// norm first, then one per group, in the order of `groups`.
pub struct GradNorms {
    pub groups: Vec<&'static str>,
    pub values: Tensor,
}

/// A map key for a device (tch's `Device` is not `Ord`).
fn device_key(d: tch::Device) -> i64 {
    match d {
        tch::Device::Cuda(i) => i as i64,
        _ => -1,
    }
}

pub struct AdamW {
    params: Vec<Param>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: i64,
    fused: bool,
    /// The step count as an f32 tensor per device, which the fused kernel reads.
    steps: BTreeMap<i64, Tensor>,
}

struct Param {
    name: String,
    tensor: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Biases and norm scales are not decayed.
pub fn decays(name: &str, tensor: &Tensor) -> bool {
    !(name.ends_with(".bias") || name.contains("norm") || name.contains(".ln_") || tensor.dim() < 2)
}

impl AdamW {
    /// AdamW over `named` with torch's defaults (betas 0.9, 0.999; eps 1e-8).
    pub fn new(named: Vec<(String, Tensor)>, weight_decay: f64) -> Self {
        let params = named
            .into_iter()
            .map(|(name, tensor)| Param {
                decay: decays(&name, &tensor),
                exp_avg: tensor.zeros_like().to_kind(Kind::Float),
                exp_avg_sq: tensor.zeros_like().to_kind(Kind::Float),
                name,
                tensor,
            })
            .collect();
        AdamW {
            params,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            fused: true,
            steps: BTreeMap::new(),
        }
    }

    /// The same with another `eps` (`train.adam_eps`).
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The defined gradients, in parameter order (what `sync_gradients` all-reduces; tensors
    /// that share storage with the parameters' gradients, so writing them updates those).
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.tensor.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// Writes the defined gradients by parameter name (test inspection, see [`crate::faults`]).
    pub fn save_gradients(&self, path: &std::path::Path) -> crate::Result<()> {
        let named: Vec<(&str, Tensor)> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.tensor.grad()))
            .filter(|(_, g)| g.defined())
            .map(|(n, g)| (n, g.to_device(tch::Device::Cpu)))
            .collect();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        }
        Tensor::write_safetensors(&named, path)
            .map_err(|e| crate::Error::Internal(format!("{}: {e}", path.display())))
    }

    /// The gradient norms, still on the device (nothing is read): the global L2 norm and that of
    /// each group of parameters (`part` names the group of a parameter name), from one foreach
    /// norm over the gradients.
    pub fn grad_norms(&self, part: impl Fn(&str) -> &'static str) -> GradNorms {
        let mut groups: BTreeMap<&'static str, Vec<Tensor>> = BTreeMap::new();
        for p in &self.params {
            let g = p.tensor.grad();
            if g.defined() {
                groups
                    .entry(part(&p.name))
                    .or_default()
                    .push(g.to_kind(Kind::Float));
            }
        }
        if groups.is_empty() {
            let device = self
                .params
                .first()
                .map_or(tch::Device::Cpu, |p| p.tensor.device());
            return GradNorms {
                groups: Vec::new(),
                values: Tensor::zeros([1], (Kind::Float, device)),
            };
        }
        // The gradients group by group, so that each group's norms are one slice (no index
        // tensor to copy to the device).
        let grads: Vec<&Tensor> = groups.values().flatten().collect();
        let norms = optim::foreach_norm(&grads); // (n,)
        let mut values = vec![norms.norm()];
        let mut start = 0;
        for g in groups.values() {
            values.push(norms.narrow(0, start, g.len() as i64).norm());
            start += g.len() as i64;
        }
        GradNorms {
            groups: groups.into_keys().collect(),
            values: Tensor::stack(&values, 0),
        }
    }

    /// Scales the gradients so that their global norm `norm` becomes `max_norm` when above it
    /// (`torch.nn.utils.clip_grad_norm_`'s factor, `max_norm / (norm + 1e-6)`).
    pub fn clip_gradients(&mut self, norm: f64, max_norm: f64) {
        if max_norm > 0.0 && norm > max_norm {
            let grads = self.gradients();
            optim::foreach_mul(&grads.iter().collect::<Vec<_>>(), max_norm / (norm + 1e-6));
        }
    }

    /// [`Self::grad_norms`] read, then [`Self::clip_gradients`]: the global norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = crate::host::f64_of(&self.grad_norms(|_| "all").values.get(0));
        self.clip_gradients(norm, max_norm);
        norm
    }

    /// Whether [`Self::step`] runs ATen's fused AdamW kernel (the default) or the per-tensor
    /// loop (the reference it is tested and benchmarked against).
    pub fn with_fused(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    /// One AdamW step at learning rate `lr` (no host sync). f32 parameters go through ATen's
    /// fused kernel, one call for the decayed ones and one for the others; parameters of another
    /// dtype (a full fine-tune in bf16, whose state is f32) through the per-tensor loop.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let h = AdamWStep {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            weight_decay: self.weight_decay,
            eps: self.eps,
        };
        let mut fused: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
        let mut looped = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let g = p.tensor.grad();
            if !g.defined() {
                continue;
            }
            let fusable = self.fused
                && p.tensor.kind() == Kind::Float
                && g.kind() == Kind::Float
                && p.tensor.is_contiguous()
                && g.is_contiguous();
            if fusable {
                fused[usize::from(p.decay)].push(i);
            } else {
                looped.push(i);
            }
        }
        for (decay, idx) in fused.iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let device = self.params[idx[0]].tensor.device();
            let step = self
                .steps
                .entry(device_key(device))
                .or_insert_with(|| Tensor::zeros([], (Kind::Float, device)));
            // The step count as the kernel reads it (exact in f32 up to 2^24 steps).
            let _ = step.fill_(self.step as f64);
            let grads: Vec<Tensor> = idx.iter().map(|&i| self.params[i].tensor.grad()).collect();
            let pick = |f: &dyn Fn(&Param) -> &Tensor| -> Vec<&Tensor> {
                idx.iter().map(|&i| f(&self.params[i])).collect()
            };
            let step = &*step;
            optim::fused_adamw(
                &pick(&|p| &p.tensor),
                &grads.iter().collect::<Vec<_>>(),
                &pick(&|p| &p.exp_avg),
                &pick(&|p| &p.exp_avg_sq),
                &vec![step; idx.len()],
                AdamWStep {
                    weight_decay: if decay == 1 { h.weight_decay } else { 0.0 },
                    ..h
                },
            );
        }
        for i in looped {
            self.loop_step(i, h);
        }
    }

    /// torch.optim.AdamW's for-loop implementation, for parameter `i`.
    fn loop_step(&mut self, i: usize, h: AdamWStep) {
        let t = self.step as f64;
        let bc1 = 1.0 - h.beta1.powf(t);
        let bc2 = 1.0 - h.beta2.powf(t);
        let p = &mut self.params[i];
        tch::no_grad(|| {
            let g = p.tensor.grad().to_kind(Kind::Float);
            if p.decay && h.weight_decay > 0.0 {
                let _ = p.tensor.g_mul_scalar_(1.0 - h.lr * h.weight_decay);
            }
            let _ = p.exp_avg.lerp_(&g, 1.0 - h.beta1);
            let _ = p.exp_avg_sq.g_mul_scalar_(h.beta2);
            let _ = p.exp_avg_sq.addcmul_(&g, &(&g * (1.0 - h.beta2)));
            let denom = p.exp_avg_sq.sqrt() / bc2.sqrt() + h.eps;
            let update = (&p.exp_avg / denom) * (-h.lr / bc1);
            let _ = p.tensor.g_add_(&update.to_kind(p.tensor.kind()));
        });
    }

    /// The state as named tensors.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone());
            out.insert(
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.shallow_clone(),
            );
        }
        out.insert("step".into(), Tensor::from(self.step));
        out
    }

    /// Restores the state [`Self::state`] gave (from the file at `path`, named in errors).
    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        path: &std::path::Path,
    ) -> crate::Result<()> {
        use crate::error::Error;
        let find = |name: &str, like: &Tensor| -> crate::Result<&Tensor> {
            let t = state
                .get(name)
                .ok_or_else(|| Error::tensor(path, name, "missing from the optimizer state"))?;
            if t.size() != like.size() {
                return Err(Error::tensor(
                    path,
                    name,
                    format!(
                        "has shape {:?}, the parameter's is {:?}",
                        t.size(),
                        like.size()
                    ),
                ));
            }
            Ok(t)
        };
        let names = self.params.len() * 2 + 1;
        if state.len() != names {
            return Err(Error::format(
                path,
                format!(
                    "holds {} tensors, this model's optimizer has {names}: another model or method?",
                    state.len()
                ),
            ));
        }
        for p in &mut self.params {
            let m = find(&format!("exp_avg.{}", p.name), &p.exp_avg)?;
            let v = find(&format!("exp_avg_sq.{}", p.name), &p.exp_avg_sq)?;
            tch::no_grad(|| {
                p.exp_avg.copy_(m);
                p.exp_avg_sq.copy_(v);
            });
        }
        self.step = crate::host::i64_of(
            state
                .get("step")
                .ok_or_else(|| Error::tensor(path, "step", "missing from the optimizer state"))?,
        );
        Ok(())
    }
}
