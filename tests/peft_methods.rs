//! The PEFT baselines besides LoRA: (IA)^3 and prefix tuning against Hugging Face PEFT's logits;
//! for every method (LoRA, head, full, BitFit, Houlsby, prefix, (IA)^3) on GPT-2 and LLaMA, a short
//! training run changes exactly the method's own parameters, leaves every frozen weight bitwise
//! unchanged, and reports the trainable-parameter count the method's definition gives.
mod common;
use common::*;
use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};
use umtune::config::PeftMethod;
use umtune::models::resolve::{load, load_with};
use umtune::models::{ArchConfig, NoHook};
use umtune::peft::{load_peft_adapter, AdapterSpec, Injector, PrefixKv, TrainingFlag};

fn path_of(name: &str) -> Result<String, Box<dyn std::error::Error>> {
    Ok(fixture(name)?.to_str().ok_or("path")?.to_string())
}

/// The plain backbone must be far from PEFT's output, or the comparison proves nothing.
fn assert_adapter_matters(base: &str, r: &HashMap<String, Tensor>) -> TestResult {
    let plain = load(&path_of(base)?, Kind::Float, Device::Cpu)?.backbone;
    let d = max_abs_diff(&padded_logits(plain.as_ref(), r), &masked(r, &r["logits"]));
    assert!(
        d > 1e-2,
        "{base}: the adapter barely changes the logits ({d:e})"
    );
    Ok(())
}

#[test]
fn ia3_logits_match_peft() -> TestResult {
    let _g = tch::no_grad_guard();
    for (base, targets, expect) in [
        ("gpt2-tiny", vec!["c_attn", "mlp.c_proj"], 4),
        ("llama-tiny-tied", vec!["k_proj", "v_proj", "down_proj"], 6),
    ] {
        let trainable = nn::VarStore::new(Device::Cpu);
        let spec = AdapterSpec::Ia3 {
            targets: targets.into_iter().map(String::from).collect(),
        };
        let inj = Injector::new(&trainable, spec, TrainingFlag::default());
        let model = load_with(&path_of(base)?, Kind::Float, Device::Cpu, &inj)?.backbone;
        assert_eq!(trainable.variables().len(), expect, "{base}: ia3 vectors");
        let tag = format!("{base}-ia3");
        load_peft_adapter(
            &trainable,
            &fixture(&tag)?.join("adapter_model.safetensors"),
        )?;
        let r = reference(&tag)?;
        let d = max_abs_diff(
            &padded_logits(model.as_ref(), &r),
            &masked(&r, &r["logits"]),
        );
        assert!(d < 1e-4, "{base}: max |logit diff| vs PEFT (IA)^3 {d:e}");
        assert_adapter_matters(base, &r)?;
    }
    Ok(())
}

#[test]
fn prefix_tuning_logits_match_peft() -> TestResult {
    let _g = tch::no_grad_guard();
    for base in ["gpt2-tiny", "llama-tiny-tied"] {
        let model = load(&path_of(base)?, Kind::Float, Device::Cpu)?.backbone;
        let trainable = nn::VarStore::new(Device::Cpu);
        let (layers, kv_heads, head_dim) = model.arch().kv_shape();
        let prefix = PrefixKv::new(&trainable.root(), 3, layers, kv_heads, head_dim);
        let tag = format!("{base}-prefix");
        load_peft_adapter(
            &trainable,
            &fixture(&tag)?.join("adapter_model.safetensors"),
        )?;
        let r = reference(&tag)?;
        let (ids, mask) = (&r["input_ids"], &r["attention_mask"]);
        let mut cache = prefix.cache(ids.size()[0], Kind::Float);
        let hidden = model.forward(ids, Some(mask), Some(&mut cache), &mut NoHook);
        let d = max_abs_diff(
            &masked(&r, &model.lm_logits(&hidden)),
            &masked(&r, &r["logits"]),
        );
        assert!(
            d < 1e-4,
            "{base}: max |logit diff| vs PEFT prefix tuning {d:e}"
        );
        assert_adapter_matters(base, &r)?;
    }
    Ok(())
}

/// Parameters the method adds to the backbone, by its definition (the head comes on top).
fn expected_adapter_params(method: PeftMethod, arch: &ArchConfig, cfg: &umtune::Config) -> i64 {
    let (layers, kv_heads, head_dim) = arch.kv_shape();
    let d = arch.hidden_size() as i64;
    let (inner, q_out, kv_out) = match arch {
        ArchConfig::Gpt2(c) => (c.inner() as i64, d, d),
        ArchConfig::Llama(c) => (
            c.intermediate_size as i64,
            (c.num_attention_heads * c.head_dim) as i64,
            kv_heads * head_dim,
        ),
    };
    let gpt2 = matches!(arch, ArchConfig::Gpt2(_));
    let per_layer = match method {
        PeftMethod::Head | PeftMethod::Full => 0,
        // q and v (LLaMA) or the fused c_attn (GPT-2): r * (in + out) each.
        PeftMethod::Lora if gpt2 => cfg.peft.r * (d + 3 * d),
        PeftMethod::Lora => cfg.peft.r * (d + q_out) + cfg.peft.r * (d + kv_out),
        // Every linear layer's output (and GPT-2's two LayerNorms).
        PeftMethod::Bitfit if gpt2 => 3 * d + d + inner + d + 2 * d,
        PeftMethod::Bitfit => q_out + 2 * kv_out + d + 2 * inner + d,
        // Bottlenecks after the attention and MLP output projections.
        PeftMethod::Houlsby => 2 * (2 * d * cfg.peft.bottleneck + cfg.peft.bottleneck + d),
        PeftMethod::Prefix => cfg.peft.num_virtual_tokens * 2 * kv_heads * head_dim,
        // c_attn's output and mlp.c_proj's input / k, v outputs and down_proj's input.
        PeftMethod::Ia3 if gpt2 => 3 * d + inner,
        PeftMethod::Ia3 => 2 * kv_out + inner,
    };
    let once = if gpt2 && method == PeftMethod::Bitfit {
        d // ln_f
    } else {
        0
    };
    layers * per_layer + once
}

/// Names a method's own parameters carry.
fn owns(method: PeftMethod, name: &str) -> bool {
    let head = name.starts_with("score.") || name.starts_with("classifier.");
    head || match method {
        PeftMethod::Head => false,
        PeftMethod::Full => true,
        PeftMethod::Lora => name.contains(".lora_A.") || name.contains(".lora_B."),
        PeftMethod::Bitfit => name.ends_with(".bias_delta"),
        PeftMethod::Houlsby => name.contains(".adapter.down.") || name.contains(".adapter.up."),
        PeftMethod::Prefix => name == "prompt_embeddings",
        PeftMethod::Ia3 => name.ends_with(".ia3_l"),
    }
}

#[test]
fn every_method_trains_only_its_own_parameters() -> TestResult {
    let models = [
        fixture("llama-tiny-gguf")?.join("tiny.gguf"),
        fixture("gpt2-tiny")?,
    ];
    let methods = [
        PeftMethod::Lora,
        PeftMethod::Head,
        PeftMethod::Full,
        PeftMethod::Bitfit,
        PeftMethod::Houlsby,
        PeftMethod::Prefix,
        PeftMethod::Ia3,
    ];
    for (m, model_path) in models.iter().enumerate() {
        for method in methods {
            let tag = format!("methods-{m}-{}", method.name());
            let mut cfg = tiny_config_on(&tag, method, model_path)?;
            cfg.peft.bottleneck = 4;
            cfg.peft.num_virtual_tokens = 3;
            cfg.peft.dropout = 0.0;
            cfg.data.max_length = 48; // GPT-2 tiny has 64 positions
            let (summary, trained) = train_model(&cfg)?;
            // The same seed rebuilds the initial weights (train_model seeds before building).
            tch::manual_seed(cfg.run.seed as i64);
            let (initial, _) = build_model(&cfg, summary.label_names.len())?;
            // Identity-initialized adapters leave the backbone's output bitwise unchanged.
            if !matches!(method, PeftMethod::Prefix | PeftMethod::Full) {
                let plain = load(&cfg.model.source, Kind::Float, Device::Cpu)?.backbone;
                let ids = Tensor::from_slice(&[5i64, 9, 3, 7, 2, 11]).view([2, 3]);
                let hidden = |b: &dyn umtune::models::Backbone| {
                    tch::no_grad(|| b.forward(&ids, None, None, &mut NoHook))
                };
                assert!(
                    hidden(initial.backbone.as_ref()).equal(&hidden(plain.as_ref())),
                    "{tag}: a fresh adapter changes the backbone's output"
                );
            }
            let before = initial.backbone.var_store().variables();
            let after = trained.backbone.var_store().variables();
            let mut changed_backbone = 0;
            for (name, t) in &before {
                if !t.equal(&after[name]) {
                    changed_backbone += 1;
                    assert_eq!(method, PeftMethod::Full, "{tag}: frozen {name} changed");
                }
            }
            if method == PeftMethod::Full {
                assert!(
                    changed_backbone * 2 > before.len(),
                    "{tag}: backbone barely trained"
                );
            }
            let init = initial.trained_vars();
            let mut head = 0;
            for (name, t) in trained.trained_vars() {
                assert!(owns(method, &name), "{tag}: {name} is trainable");
                if method != PeftMethod::Full {
                    assert!(!t.equal(&init[&name]), "{tag}: {name} never moved");
                }
                if name.starts_with("score.") || name.starts_with("classifier.") {
                    head += t.numel() as i64;
                }
            }
            let arch = trained.backbone.arch();
            let adapters = if method == PeftMethod::Full {
                trained.backbone.num_parameters()
            } else {
                expected_adapter_params(method, arch, &cfg)
            };
            assert_eq!(
                summary.trainable_params,
                adapters + head,
                "{tag}: trainable parameter count"
            );
            assert!(summary.validation.loss.is_finite(), "{tag}: loss");
        }
    }
    Ok(())
}
