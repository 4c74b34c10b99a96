//! Activation checkpointing computes what the plain run computes: the same gradients at the first
//! step and the same weights after five, on GPT-2 and LLaMA test models, with LoRA dropout (q and v
//! sharing theirs), UM's feature noise and heteroscedastic samples, and the memory on (the
//! recomputed blocks replay their random draws), and over a quantized (q4) base.
//!
//! Tolerance: the recompute runs the same operations on the same inputs in the same order, so the
//! results are expected to be bitwise equal; 1e-6 of a tensor's norm (what the issue asks) allows
//! for a kernel that picks another reduction order for the recompute's shapes. A draw that is not
//! replayed (another dropout mask on the recomputed block) moves a gradient by ~dropout/(1-dropout)
//! of its size, 5e-2 here; a segment recomputed from the wrong input, by O(1).
mod common;

use common::fixture;
use common::process::{assert_tensors_close, check, umtune_bin};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

const TOL: f64 = 1e-6;

/// One `umtune train` of `steps` steps on `model`, dumping every step's gradients; returns the
/// run directory and the gradients' directory.
fn train(out: &Path, name: &str, model: &Path, steps: usize, sets: &[&str]) -> (PathBuf, PathBuf) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/ablations/lora-um-ema.toml");
    let base = [
        format!("model.source={}", model.display()),
        "model.device=cpu".into(),
        "data.dataset=uci-sentiment".into(),
        "data.train_limit=48".into(),
        "data.eval_limit=16".into(),
        format!("train.max_steps={steps}"),
        "train.batch_size=8".into(),
        "train.lr=0.01".into(),
        // AdamW's update is ~lr * sign(g) for |g| >> eps: eps = 0.1 keeps it proportional to g,
        // so equal gradients give equal weights without amplifying last-bit differences.
        "train.adam_eps=0.1".into(),
        "peft.dropout=0.2".into(),
        "run.threads=1".into(),
        format!("run.output_dir={}", out.display()),
        format!("run.name={name}"),
    ];
    let grads = out.join(format!("{name}-grads"));
    let mut cmd = Command::new(umtune_bin());
    cmd.arg("train").arg(&config);
    for s in base.iter().map(String::as_str).chain(sets.iter().copied()) {
        cmd.args(["--set", s]);
    }
    let done = cmd
        .env("UMTUNE_TEST_DUMP_GRADIENTS", &grads)
        .output()
        .expect("umtune runs");
    check(&done, name);
    (out.join(name), grads)
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

#[test]
fn checkpointed_training_matches_plain_training() {
    let out = common::fresh_dir("checkpointing");
    let _ = std::fs::remove_dir_all(&out);
    let llama = fixture("llama-tiny-gguf").unwrap().join("tiny.gguf");
    let gpt2 = fixture("gpt2-tiny").unwrap();
    // UM's estimator and the memory on block 1: block 0 is checkpointed; without them both
    // blocks are, one segment each (`true`) or together (2).
    let plugged: &[&str] = &["uncertainty.layers=[1]", "memory.layer=1"];
    let bare: &[&str] = &["uncertainty.enabled=false", "memory.enabled=false"];
    let q4: &[&str] = &[bare[0], bare[1], "model.quantize=q4"];
    let cases: [(&str, &Path, &[&str], &[&str]); 4] = [
        ("llama-um-memory", &llama, plugged, &["true"]),
        ("llama-lora", &llama, bare, &["true", "2"]),
        // The quantized base dequantizes again in the recompute.
        ("llama-q4", &llama, q4, &["true"]),
        ("gpt2-um-memory", &gpt2, plugged, &["true"]),
    ];
    for (label, model, sets, modes) in cases {
        let targets = if label.starts_with("gpt2") {
            "peft.targets=[\"c_attn\", \"c_fc\"]"
        } else {
            "peft.targets=[\"q_proj\", \"v_proj\", \"up_proj\"]"
        };
        fn with<'a>(sets: &[&'a str], targets: &'a str, extra: &'a str) -> Vec<&'a str> {
            sets.iter().copied().chain([targets, extra]).collect()
        }
        let plain_name = format!("{label}-plain");
        let (plain, plain_grads) = train(
            &out,
            &plain_name,
            model,
            5,
            &with(sets, targets, "train.activation_checkpointing=false"),
        );
        for mode in modes {
            let name = format!("{label}-ckpt-{mode}");
            let setting = format!("train.activation_checkpointing={mode}");
            let (ckpt, ckpt_grads) = train(&out, &name, model, 5, &with(sets, targets, &setting));
            let step1 = "step_000001.safetensors";
            let (g, _) = assert_tensors_close(
                &format!("{name} step-1 gradients"),
                &tensors(&plain_grads.join(step1)),
                &tensors(&ckpt_grads.join(step1)),
                TOL,
            );
            let (w, _) = assert_tensors_close(
                &format!("{name} weights after 5 steps"),
                &tensors(&plain.join("trainable.safetensors")),
                &tensors(&ckpt.join("trainable.safetensors")),
                TOL,
            );
            eprintln!("{name}: gradients within {g:e}, weights within {w:e}");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}
