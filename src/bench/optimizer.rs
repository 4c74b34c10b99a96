//! `umtune bench-optimizer`: one AdamW step with clipping on the LoRA parameter set of the
//! configured model (`preset:llama3-8b` with `peft.targets` on every linear layer: 449 tensors),
//! built without the model, random gradients: ATen's fused AdamW against the per-tensor loop it
//! replaced, and the foreach norm against the per-tensor norms, on the configured device.
use super::median_secs;
use crate::config::Config;
use crate::error::Result;
use crate::train::optimizer::AdamW;
use crate::train::plan::lora_parameter_shapes;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

/// `umtune bench-optimizer`'s arguments.
#[derive(clap::Args, Debug)]
pub struct OptimizerArgs {
    #[command(flatten)]
    pub cfg: crate::config::ConfigArgs,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
}

/// Median seconds per step of the fused and the looped AdamW (clipping included), and of the
/// gradient norm each way.
pub fn optimizer(cfg: &Config, args: &OptimizerArgs) -> Result<Value> {
    let device = crate::dist::RunContext::single(cfg)?.device;
    let shapes = lora_parameter_shapes(cfg, 2)?;
    let params = || -> Vec<(String, Tensor)> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = (Tensor::randn(*s, (Kind::Float, device)) * 0.02).set_requires_grad(true);
                // d/dt sum(t * g) = g: a random gradient, kept for every timed step.
                let g = Tensor::randn(*s, (Kind::Float, device)) * 1e-3;
                (&t * g).sum(Kind::Float).backward();
                (format!("p{i}.weight"), t)
            })
            .collect()
    };
    let n_params: i64 = shapes.iter().map(|s| s[0] * s[1]).sum();
    let time = |fused: bool| -> Result<f64> {
        let mut opt = AdamW::new(params(), cfg.train.weight_decay).with_fused(fused);
        median_secs(device, args.iters, args.warmup, || {
            if fused {
                let norm = crate::host::f64_of(&opt.grad_norms(|_| "all").values.get(0));
                opt.clip_gradients(norm, 1e9);
            } else {
                let norms: Vec<Tensor> = opt.gradients().iter().map(|g| g.norm()).collect();
                let norm = crate::host::f64_of(&Tensor::stack(&norms, 0).norm());
                opt.clip_gradients(norm, 1e9);
            }
            opt.step(1e-4);
            Ok(())
        })
    };
    let (fused, looped) = (time(true)?, time(false)?);
    Ok(json!({
        "model": cfg.model.source, "device": format!("{device:?}"), "tensors": shapes.len(),
        "parameters": n_params, "threads": tch::get_num_threads(),
        "fused_secs": fused, "loop_secs": looped, "fused_over_loop": fused / looped,
        "shapes": shapes,
    }))
}
