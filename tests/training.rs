//! The fine-tuning loop: AdamW against torch.optim.AdamW, the schedule and metrics, frozen
//! weights bitwise unchanged, same seed same numbers, and a real model learning a real dataset.
mod common;
use common::*;
use tch::{Device, Kind};
use umtune::config::{PeftMethod, ScheduleKind};
use umtune::models::resolve::load;
use umtune::train::metrics::{accuracy, macro_f1};
use umtune::train::optimizer::AdamW;
use umtune::train::schedule::learning_rate;

#[test]
fn adamw_matches_torch() -> TestResult {
    let r = reference("adamw")?;
    let w = r["w0"].copy().set_requires_grad(true);
    let b = r["b0"].copy().set_requires_grad(true);
    // Names decide decay: the matrix decays, the bias does not (as the reference's groups).
    let mut opt = AdamW::new(
        vec![
            ("layer.weight".into(), w.shallow_clone()),
            ("layer.bias".into(), b.shallow_clone()),
        ],
        0.1,
    );
    for (step, lr) in [1e-2, 5e-3, 2e-2].into_iter().enumerate() {
        opt.zero_grad();
        // d/dp sum(p * g) = g
        let loss = (&w * &r[&format!("gw{step}")]).sum(Kind::Float)
            + (&b * &r[&format!("gb{step}")]).sum(Kind::Float);
        loss.backward();
        opt.step(lr);
        assert_close(
            &format!("weight after step {}", step + 1),
            &w,
            &r[&format!("w{}", step + 1)],
            1e-6,
        );
        assert_close(
            &format!("bias after step {}", step + 1),
            &b,
            &r[&format!("b{}", step + 1)],
            1e-6,
        );
    }
    let state = opt.state();
    assert!(
        state.contains_key("exp_avg.layer.weight") && state.contains_key("exp_avg_sq.layer.bias")
    );
    assert_eq!(state["step"].int64_value(&[]), 3);
    Ok(())
}

#[test]
fn schedules_warm_up_then_decay() {
    let lr = |k, s| learning_rate(k, 1.0, s, 10, 110);
    assert!((lr(ScheduleKind::Cosine, 0) - 0.1).abs() < 1e-12);
    assert!((lr(ScheduleKind::Cosine, 9) - 1.0).abs() < 1e-12);
    assert!((lr(ScheduleKind::Cosine, 60) - 0.5).abs() < 1e-12);
    assert!(lr(ScheduleKind::Cosine, 110) < 1e-12);
    assert!((lr(ScheduleKind::Linear, 60) - 0.5).abs() < 1e-12);
    assert!((lr(ScheduleKind::Constant, 100) - 1.0).abs() < 1e-12);
}

#[test]
fn metrics_by_hand() {
    let gold = [0, 0, 1, 1, 2, 2];
    let pred = [0, 1, 1, 1, 0, 2];
    assert!((accuracy(&pred, &gold) - 4.0 / 6.0).abs() < 1e-12);
    // F1 per class: 0 -> 2*1/(2+1+1) = 0.5; 1 -> 2*2/(4+1+0) = 0.8; 2 -> 2*1/(2+0+1) = 2/3.
    assert!((macro_f1(&pred, &gold, 3) - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    // A class never seen nor predicted counts as 0 (scikit-learn's zero_division=0).
    assert!((macro_f1(&[0, 1], &[0, 1], 3) - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn frozen_backbone_stays_bitwise_unchanged() -> TestResult {
    for (tag, method) in [
        ("frozen-lora", PeftMethod::Lora),
        ("frozen-head", PeftMethod::Head),
    ] {
        let cfg = tiny_config(tag, method)?;
        let (summary, model) = train_model(&cfg)?;
        let fresh = load(&cfg.model.source, Kind::Float, Device::Cpu)?.backbone;
        let after = model.backbone.var_store().variables();
        for (name, before) in fresh.var_store().variables() {
            // A task model leaves an untied LM head unread.
            match after.get(&name) {
                Some(t) => assert!(before.equal(t), "{tag}: frozen {name} changed"),
                None => assert_eq!(name, "lm_head.weight", "{tag}: {name} missing"),
            }
        }
        let names: Vec<String> = model.trainable.variables().into_keys().collect();
        if method == PeftMethod::Head {
            assert_eq!(names, ["score.weight"]);
        } else {
            assert!(
                names.iter().any(|n| n.contains("lora_A"))
                    && names.iter().any(|n| n == "score.weight")
            );
        }
        // The parameter count is what the saved file holds.
        let saved = tch::Tensor::read_safetensors(summary.run_dir.join("trainable.safetensors"))?;
        let in_file: i64 = saved.iter().map(|(_, t)| t.numel() as i64).sum();
        assert_eq!(summary.trainable_params, in_file);
        assert!(summary.run_dir.join("summary.json").exists());
        // metrics.jsonl: a line per logged step (log_every 1 here would be 1..4; the default 10
        // logs the last step), the schedule's learning rate, then the final evaluations.
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(summary.run_dir.join("metrics.jsonl"))?
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()?;
        let total = cfg.train.max_steps;
        let warmup = (cfg.train.warmup_ratio * total as f64).round() as usize;
        let train_lines: Vec<&serde_json::Value> =
            lines.iter().filter(|l| l.get("loss").is_some()).collect();
        assert_eq!(train_lines.len(), 1, "{lines:?}");
        assert_eq!(train_lines[0]["step"], total);
        let lr = learning_rate(cfg.train.schedule, cfg.train.lr, total - 1, warmup, total);
        assert_eq!(train_lines[0]["lr"].as_f64(), Some(lr));
        assert!(train_lines[0]["loss"].as_f64().is_some_and(f64::is_finite));
        let evals: Vec<(&str, u64)> = lines
            .iter()
            .filter_map(|l| Some((l.get("split")?.as_str()?, l["step"].as_u64()?)))
            .collect();
        assert_eq!(
            evals,
            [("validation", total as u64), ("test", total as u64)]
        );
        assert_eq!(
            lines.last().ok_or("empty")?["eval"]["accuracy"].as_f64(),
            summary.test.as_ref().map(|t| t.accuracy)
        );
    }
    Ok(())
}

#[test]
fn lora_targets_that_match_nothing_are_an_error() -> TestResult {
    let mut cfg = tiny_config("no-targets", PeftMethod::Lora)?;
    cfg.peft.targets = vec!["c_attn".into()]; // a GPT-2 name on a LLaMA model
    let e = train_model(&cfg)
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(e.contains("peft.targets") && e.contains("q_proj"), "{e}");
    Ok(())
}

#[test]
fn autocast_computes_in_bf16_and_restores_the_state() -> TestResult {
    use umtune::ffi::autocast::autocast;
    let a = tch::Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
    let b = tch::Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
    let inside = autocast(Device::Cpu, Kind::BFloat16, || a.matmul(&b));
    assert_eq!(
        inside.kind(),
        Kind::BFloat16,
        "autocast did not take effect"
    );
    let nested = autocast(Device::Cpu, Kind::BFloat16, || {
        autocast(Device::Cpu, Kind::Half, || a.matmul(&b)).kind()
    });
    assert_eq!(nested, Kind::Half);
    assert_eq!(a.matmul(&b).kind(), Kind::Float, "autocast left enabled");
    let full = a.matmul(&b);
    let d = max_abs_diff(&inside, &full);
    assert!(d > 0.0 && d < 0.1, "bf16 matmul error {d}");

    // A training run under autocast trains; its model's logits with and without autocast agree
    // within bf16 error. (Runs are not compared: tests share libtorch's global RNG.)
    let mut cfg = tiny_config("autocast", PeftMethod::Lora)?;
    cfg.train.autocast = umtune::config::Autocast::Bf16;
    let (_, mut model) = train_model(&cfg)?;
    // The adapters trained under autocast: LoRA's B starts at zero.
    for (name, t) in model
        .named_trainable()
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
    {
        assert!(
            t.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name} never trained"
        );
    }
    let ids = tch::Tensor::from_slice(&[5i64, 9, 3, 7]).view([1, 4]);
    let mask = ids.ones_like();
    let low = tch::no_grad(|| model.logits(&ids, &mask))?;
    assert_eq!(low.kind(), Kind::Float);
    model.autocast = None;
    let full = tch::no_grad(|| model.logits(&ids, &mask))?;
    let gap = max_abs_diff(&low, &full);
    assert!(gap > 0.0 && gap < 0.1, "bf16 vs f32 logits differ by {gap}");
    Ok(())
}

/// GPT-2 tiny with the embedding rows of `poison`'s tokens set to NaN, and a dataset where every
/// other example contains that word: those batches give a NaN loss, the others are fine.
fn poisoned_setup(
    tag: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf), Box<dyn std::error::Error>> {
    let root = common::fresh_dir(&format!("nan-{tag}"));
    let (model, data) = (root.join("model"), root.join("data"));
    std::fs::create_dir_all(&model)?;
    std::fs::create_dir_all(&data)?;
    let src = fixture("gpt2-tiny")?;
    for f in ["config.json", "vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), model.join(f))?;
    }
    let tok =
        umtune::models::resolve::load_tokenizer(src.to_str().ok_or("path")?)?.ok_or("tokenizer")?;
    let clean = ["the movie was good", "the movie was bad"];
    let mut clean_ids = std::collections::BTreeSet::new();
    for t in clean {
        clean_ids.extend(tok.encode(t)?);
    }
    let poison: Vec<u32> = tok
        .encode(" QQXZ")?
        .into_iter()
        .filter(|i| !clean_ids.contains(i))
        .collect();
    assert!(
        !poison.is_empty(),
        "no token of the poison word is unique to it"
    );
    let mut tensors = tch::Tensor::read_safetensors(src.join("model.safetensors"))?;
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("wte.weight") {
            for &i in &poison {
                let _ = t.get(i as i64).fill_(f64::NAN);
            }
        }
    }
    tch::Tensor::write_safetensors(&tensors, model.join("model.safetensors"))?;
    let mut lines = String::new();
    for i in 0..64 {
        let text = if i % 2 == 0 {
            clean[i % 4 / 2].to_string()
        } else {
            format!("{} QQXZ", clean[i % 4 / 2])
        };
        let label = if i % 4 < 2 { "pos" } else { "neg" };
        lines.push_str(&serde_json::json!({"text": text, "label": label}).to_string());
        lines.push('\n');
    }
    std::fs::write(data.join("train.jsonl"), &lines)?;
    let valid: String = lines.lines().step_by(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(data.join("validation.jsonl"), valid)?;
    Ok((model, data))
}

fn poisoned_config(
    tag: &str,
    max_bad: usize,
) -> Result<umtune::Config, Box<dyn std::error::Error>> {
    let (model, data) = poisoned_setup(tag)?;
    let mut cfg = tiny_config_on(tag, PeftMethod::Lora, &model)?;
    cfg.data.dataset = data.display().to_string();
    cfg.data.max_length = 32;
    cfg.train.batch_size = 1;
    cfg.train.max_steps = 40;
    cfg.train.eval_every = 1;
    cfg.train.max_bad_steps = max_bad;
    Ok(cfg)
}

#[test]
fn non_finite_losses_are_skipped_then_stop_training() -> TestResult {
    // Isolated NaN batches are skipped and counted; the weights stay finite.
    let cfg = poisoned_config("skip", 1000)?;
    let (summary, model) = train_model(&cfg)?;
    // Exactly the steps whose (one-example) batch holds a poisoned example: the odd lines.
    let tok = umtune::models::resolve::load_tokenizer(&cfg.model.source)?.ok_or("tokenizer")?;
    let data = umtune::data::dataset::load_data(&cfg, &tok)?;
    let lengths: Vec<usize> = data.train.iter().map(|e| e.ids.len()).collect();
    let mut sampler = umtune::data::batching::Sampler::new(cfg.run.seed, 1);
    let poisoned = (0..cfg.train.max_steps)
        .filter(|_| sampler.next_batch(&lengths)[0] % 2 == 1)
        .count();
    assert!(poisoned > 0 && poisoned < cfg.train.max_steps);
    assert_eq!(summary.skipped_steps, poisoned);
    for (name, t) in model.named_trainable() {
        assert!(
            t.isfinite().all().int64_value(&[]) == 1,
            "{name} is not finite"
        );
    }
    // Two bad steps in a row stop the run with a message; the last evaluation's weights stay.
    let cfg = poisoned_config("stop", 2)?;
    let e = train_model(&cfg)
        .err()
        .ok_or("expected a stop")?
        .to_string();
    assert!(
        e.contains("training diverged at step") && e.contains("2 consecutive non-finite losses"),
        "{e}"
    );
    assert!(e.contains("weights of the last evaluation (step"), "{e}");
    let dir = std::fs::read_dir(&cfg.run.output_dir)?
        .next()
        .ok_or("no run dir")??
        .path();
    let saved = tch::Tensor::read_safetensors(dir.join("trainable.safetensors"))?;
    assert!(!saved.is_empty());
    for (name, t) in saved {
        assert!(
            t.isfinite().all().int64_value(&[]) == 1,
            "saved {name} is not finite"
        );
    }
    Ok(())
}

/// The fused AdamW kernel (ATen's `_fused_adamw_`, the default) against the per-tensor loop
/// (torch.optim.AdamW's for-loop formula, checked against torch above) over 20 steps with random
/// gradients, decayed matrices and an undecayed bias, at two learning rates. Both compute the
/// same f32 formula; they may differ only in the order of a few roundings per element and step
/// (the kernel's `param - step_size * m / denom` against the loop's `(m / denom) * -step_size`),
/// each at most half an ulp of the value it rounds. A step's update then differs by a few
/// ulps of the update (|update| <= lr * sqrt(1 - beta2^t) / (1 - beta1^t) <= ~3 lr), and the
/// parameter's rounding by at most one ulp of the parameter, so after k steps
/// |fused - loop| <= k * (ulp(|p|max) + 8 * 2^-24 * 3 lr): with |p| < 4, k = 20, lr <= 0.05 that
/// is 20 * (4.8e-7 + 7.2e-8) ~= 1.1e-5, an order above what one reordered rounding gives and far
/// below what one wrong term would (a missing bias correction or decay moves p by ~lr per step).
#[test]
fn fused_adamw_equals_the_per_tensor_loop() -> TestResult {
    tch::manual_seed(7);
    let make = || {
        vec![
            (
                "a.weight".to_string(),
                tch::Tensor::randn([64, 48], (Kind::Float, Device::Cpu)),
            ),
            (
                "b.weight".to_string(),
                tch::Tensor::randn([48, 3], (Kind::Float, Device::Cpu)),
            ),
            (
                "b.bias".to_string(),
                tch::Tensor::randn([3], (Kind::Float, Device::Cpu)),
            ),
        ]
    };
    let start = make();
    let grads: Vec<Vec<tch::Tensor>> = (0..20)
        .map(|_| start.iter().map(|(_, t)| t.randn_like() * 0.1).collect())
        .collect();
    for lr in [1e-3, 5e-2] {
        let copy = |named: &[(String, tch::Tensor)]| -> Vec<(String, tch::Tensor)> {
            named
                .iter()
                .map(|(n, t)| (n.clone(), t.copy().set_requires_grad(true)))
                .collect()
        };
        let (fp, lp) = (copy(&start), copy(&start));
        let shallow = |named: &[(String, tch::Tensor)]| -> Vec<(String, tch::Tensor)> {
            named
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()
        };
        let mut fused = AdamW::new(shallow(&fp), 0.1);
        let mut looped = AdamW::new(shallow(&lp), 0.1).with_fused(false);
        for g in &grads {
            for (opt, params) in [(&mut fused, &fp), (&mut looped, &lp)] {
                opt.zero_grad();
                let loss = params
                    .iter()
                    .zip(g)
                    .map(|((_, p), g)| (p * g).sum(Kind::Float))
                    .fold(
                        tch::Tensor::zeros([], (Kind::Float, Device::Cpu)),
                        |a, b| a + b,
                    );
                loss.backward();
                opt.step(lr);
            }
        }
        let mut worst = 0.0f64;
        for ((name, f), (_, l)) in fp.iter().zip(&lp) {
            let d = max_abs_diff(f, l);
            assert!(d <= 1.1e-5, "lr {lr}: {name} differs by {d:e}");
            worst = worst.max(d);
            // Both moved: the step did something (20 steps of ~lr each).
            let (_, s) = start.iter().find(|(n, _)| n == name).ok_or("param")?;
            assert!(max_abs_diff(f, s) > lr, "lr {lr}: {name} did not move");
        }
        for (key, m) in fused.state() {
            let d = max_abs_diff(&m, &looped.state()[&key]);
            assert!(d <= 1e-5, "lr {lr}: optimizer state {key} differs by {d:e}");
        }
        eprintln!("lr {lr}: fused vs loop, max |diff| over the parameters {worst:e}");
    }
    Ok(())
}

/// The training loop reads device values into host memory once per step that does not log (the
/// loss and the gradient norms together; issue 22's target is at most 2), also with uncertainty
/// modeling, activation checkpointing and gradient accumulation, twice with the memory in one
/// process; a logged step adds one read for the probes. metrics.jsonl reports both counts
/// ([`umtune::host`] counts every read).
#[test]
fn a_training_step_reads_the_device_once() -> TestResult {
    // (tag, UM, memory, checkpointing, accumulation): the memory adds one read, at its write
    // (how many entries to drop as non-finite or padding).
    for (tag, um, memory, checkpointing, accum) in [
        ("reads-lora", false, false, false, 1),
        ("reads-um", true, false, false, 1),
        ("reads-um-ckpt", true, false, true, 2),
        ("reads-memory", true, true, false, 2),
    ] {
        let mut cfg = tiny_config(tag, PeftMethod::Lora)?;
        cfg.train.max_steps = 6;
        cfg.train.log_every = 3;
        cfg.train.grad_accum = accum;
        cfg.uncertainty.enabled = um;
        cfg.memory.enabled = memory;
        if checkpointing {
            cfg.train.activation_checkpointing = umtune::config::Checkpointing(1);
        }
        let logged = training_lines(&train(&cfg)?.run_dir)?;
        assert_eq!(logged.len(), 2, "{tag}: {logged:?}");
        let step = 1 + u64::from(memory);
        for l in logged {
            assert_eq!(l["host_reads_unlogged_max"], step, "{tag}: {l}");
            let probes = u64::from(um || memory);
            assert_eq!(l["host_reads"], step + probes, "{tag}: {l}");
        }
    }
    Ok(())
}

/// `train.tf32` reaches libtorch's global context through the shim (the flag
/// `torch.backends.cuda.matmul.allow_tf32` sets; off by default in libtorch, as in PyTorch). The
/// setup sets it on CUDA only, where cuBLAS reads it; on the CPU it changes nothing.
#[test]
fn the_tf32_switch_reaches_libtorch() {
    use umtune::ffi::optim::{allow_tf32, set_allow_tf32};
    let before = allow_tf32();
    set_allow_tf32(true);
    assert!(allow_tf32());
    set_allow_tf32(false);
    assert!(!allow_tf32());
    set_allow_tf32(before);
}
