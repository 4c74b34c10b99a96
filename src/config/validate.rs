//! `Config::validate`: the checks serde's types cannot express, run before any tensor exists,
//! with messages that say what to change. Ranges are one table checked in one loop.
use super::{Config, Dtype, PeftMethod, Quantize};
use crate::error::{Error, Result};
use std::path::Path;

impl Config {
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(msg));
        if self.model.source.trim().is_empty() {
            return fail(
                "model.source is empty: give a directory, a .gguf file, a hub id or `default`"
                    .into(),
            );
        }
        if self.data.dataset.trim().is_empty() {
            return fail("data.dataset is empty: give a dataset name or a directory".into());
        }
        let (d, p, t, m, u) = (
            &self.data,
            &self.peft,
            &self.train,
            &self.memory,
            &self.uncertainty,
        );
        let (one_or_more, positive, zero_or_more) = ("1 or more", "a positive number", "0 or more");
        // (key, its value, whether it is in range, the range in words)
        #[rustfmt::skip]
        let ranges: Vec<(&str, String, bool, &str)> = vec![
            ("checkpoint.keep", self.checkpoint.keep.to_string(), self.checkpoint.keep > 0, "at least 1"),
            ("dist.timeout_s", self.dist.timeout_s.to_string(), self.dist.timeout_s > 0, "a positive number of seconds"),
            ("data.max_length", d.max_length.to_string(), d.max_length >= 2, "2 or more"),
            ("peft.r", p.r.to_string(), p.r >= 1, one_or_more),
            ("peft.bottleneck", p.bottleneck.to_string(), p.bottleneck >= 1, one_or_more),
            ("peft.num_virtual_tokens", p.num_virtual_tokens.to_string(), p.num_virtual_tokens >= 1, one_or_more),
            ("peft.alpha", p.alpha.to_string(), p.alpha > 0.0, positive),
            ("peft.dropout", p.dropout.to_string(), (0.0..1.0).contains(&p.dropout), "0 <= dropout < 1"),
            ("train.epochs", t.epochs.to_string(), t.epochs >= 1, one_or_more),
            ("train.batch_size", t.batch_size.to_string(), t.batch_size >= 1, one_or_more),
            ("train.grad_accum", t.grad_accum.to_string(), t.grad_accum >= 1, one_or_more),
            ("train.lr", t.lr.to_string(), t.lr > 0.0 && t.lr < 1.0, "0 < lr < 1"),
            ("train.weight_decay", t.weight_decay.to_string(), t.weight_decay >= 0.0, zero_or_more),
            ("train.adam_eps", t.adam_eps.to_string(), t.adam_eps > 0.0 && t.adam_eps.is_finite(), "above 0 (1e-8 is AdamW's usual value)"),
            ("train.warmup_ratio", t.warmup_ratio.to_string(), (0.0..=1.0).contains(&t.warmup_ratio), "0 to 1"),
            ("train.max_grad_norm", t.max_grad_norm.to_string(), t.max_grad_norm >= 0.0, "0 (off) or more"),
            ("train.log_every", t.log_every.to_string(), t.log_every >= 1, one_or_more),
            ("memory.capacity", m.capacity.to_string(), m.capacity >= 1 && m.capacity < 1 << 31, "1 to 2^31 - 1"),
            ("memory.key_size", m.key_size.to_string(), m.key_size >= 1, one_or_more),
            ("memory.k", m.k.to_string(), m.k >= 1, one_or_more),
            ("memory.tau", m.tau.to_string(), m.tau > 0.0, positive),
            ("memory.layer", m.layer.to_string(), m.layer >= -1, "a block index, or -1 for the last"),
            ("memory.lambda_mem", m.lambda_mem.to_string(), m.lambda_mem >= 0.0, zero_or_more),
            ("uncertainty.rank", u.rank.to_string(), u.rank >= 1, one_or_more),
            ("uncertainty.n_mc", u.n_mc.to_string(), u.n_mc >= 1, one_or_more),
            ("uncertainty.mc_predict", u.mc_predict.to_string(), u.mc_predict >= 0, "0 (deterministic) or more"),
            ("uncertainty.noise_scale", u.noise_scale.to_string(), u.noise_scale >= 0.0, zero_or_more),
            ("uncertainty.lambda_var", u.lambda_var.to_string(), u.lambda_var >= 0.0, zero_or_more),
            ("uncertainty.prior_var", u.prior_var.to_string(), u.prior_var > 0.0 && u.prior_var.is_finite(), positive),
            ("run.threads", self.run.threads.to_string(), self.run.threads <= 1024, "0 (libtorch default) to 1024"),
        ];
        for (key, value, ok, want) in ranges {
            if !ok {
                return fail(format!("{key} = {value} is out of range: use {want}"));
            }
        }
        d.train_corruption.validate("data.train_corruption")?;
        d.eval_corruption.validate("data.eval_corruption")?;
        if p.method == PeftMethod::Full && self.model.dtype != Dtype::F32 {
            return fail(format!(
                "peft.method = \"full\" updates the backbone in place and keeps no f32 master copy: set model.dtype = \"f32\" (it is {:?})",
                self.model.dtype
            ));
        }
        if p.method == PeftMethod::Full && self.model.quantize != Quantize::None {
            return fail(format!(
                "model.quantize = \"{}\" holds the base frozen as quantized blocks, and peft.method = \"full\" trains every weight: use an adapter method or model.quantize = \"none\"",
                self.model.quantize.as_str()
            ));
        }
        if u.mc_predict > 0 && !u.enabled {
            return fail(format!(
                "uncertainty.mc_predict = {}: MC sampling needs uncertainty.enabled = true",
                u.mc_predict
            ));
        }
        if m.k > m.capacity {
            return fail(format!(
                "memory.k = {} exceeds memory.capacity = {}: a query cannot read more entries than the memory holds",
                m.k, m.capacity
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = d.label_names.iter().find(|n| !seen.insert(n.as_str())) {
            return fail(format!(
                "data.label_names has `{dup}` twice: each label needs one name"
            ));
        }
        if !self.run.name.is_empty() && !is_plain_name(&self.run.name) {
            return fail(format!(
                "run.name = `{}` must be a plain directory name (no `/`, no `..`): runs are written inside run.output_dir",
                self.run.name
            ));
        }
        Ok(())
    }
}

/// Whether `name` is one plain path component (no `..`, no `/`, not absolute).
fn is_plain_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}
