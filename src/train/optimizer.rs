//! AdamW (Loshchilov & Hutter 2019) with decoupled weight decay, as `torch.optim.AdamW` computes
//! it, with its state as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`, `step`) so that it can
//! be checkpointed. Written here because tch's optimizer keeps its state inside libtorch.
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

pub struct AdamW {
    params: Vec<Param>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: i64,
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

    /// Global L2 norm of the gradients, with one device-to-host copy.
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> = self
            .gradients()
            .iter()
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        Tensor::stack(&norms, 0).norm().double_value(&[])
    }

    /// The gradient norm of each group of parameters (`part` names the group of a parameter
    /// name), with one device-to-host copy.
    pub fn grad_norms_by(
        &self,
        part: impl Fn(&str) -> &'static str,
    ) -> crate::Result<BTreeMap<String, f64>> {
        let mut groups: BTreeMap<&'static str, Vec<Tensor>> = BTreeMap::new();
        for p in &self.params {
            let g = p.tensor.grad();
            if g.defined() {
                groups
                    .entry(part(&p.name))
                    .or_default()
                    .push(g.to_kind(Kind::Float).norm());
            }
        }
        if groups.is_empty() {
            return Ok(BTreeMap::new());
        }
        let names: Vec<&'static str> = groups.keys().copied().collect();
        let norms: Vec<Tensor> = groups
            .values()
            .map(|v| Tensor::stack(v, 0).norm())
            .collect();
        let values = Vec::<f64>::try_from(Tensor::stack(&norms, 0).to_kind(Kind::Double))?;
        Ok(names.into_iter().map(String::from).zip(values).collect())
    }

    /// Scales gradients so that their global norm is at most `max_norm`; returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if max_norm > 0.0 && norm > max_norm {
            let factor = max_norm / (norm + 1e-6);
            for p in &mut self.params {
                let mut g = p.tensor.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(factor);
                }
            }
        }
        norm
    }

    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let bc1 = 1.0 - self.beta1.powf(t);
        let bc2 = 1.0 - self.beta2.powf(t);
        let (b1, b2, eps, wd) = (self.beta1, self.beta2, self.eps, self.weight_decay);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                if p.decay && wd > 0.0 {
                    let _ = p.tensor.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = p.exp_avg.lerp_(&g, 1.0 - b1);
                let _ = p.exp_avg_sq.g_mul_scalar_(b2);
                let _ = p.exp_avg_sq.addcmul_(&g, &(&g * (1.0 - b2)));
                let denom = p.exp_avg_sq.sqrt() / bc2.sqrt() + eps;
                let update = (&p.exp_avg / denom) * (-lr / bc1);
                let _ = p.tensor.g_add_(&update.to_kind(p.tensor.kind()));
            }
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
        self.step = state
            .get("step")
            .ok_or_else(|| Error::tensor(path, "step", "missing from the optimizer state"))?
            .int64_value(&[]);
        Ok(())
    }
}
