//! LoRA against Hugging Face PEFT: adapters with random A and B (PEFT's init_lora_weights=False)
//! loaded into umtune give PEFT's logits; fresh adapters leave the backbone's output untouched;
//! gradients reach the adapters and nothing else.
mod common;
use common::*;
use tch::{nn, Device, Kind, Tensor};
use umtune::models::resolve::{load, load_with};
use umtune::peft::{
    load_peft_adapter, Injector, LoraLinear, LoraSpec, SharedDropout, TrainingFlag,
};

fn spec_from(dir: &std::path::Path) -> Result<LoraSpec, Box<dyn std::error::Error>> {
    let cfg = read_json(dir.join("adapter_config.json"))?;
    Ok(LoraSpec {
        r: cfg["r"].as_i64().ok_or("r")?,
        alpha: cfg["lora_alpha"].as_f64().ok_or("lora_alpha")?,
        dropout: cfg["lora_dropout"].as_f64().ok_or("lora_dropout")?,
        rslora: cfg["use_rslora"].as_bool().ok_or("use_rslora")?,
        targets: serde_json::from_value(cfg["target_modules"].clone())?,
    })
}

#[test]
fn lora_logits_match_peft() -> TestResult {
    let _g = tch::no_grad_guard();
    for (base, expect_adapters) in [("gpt2-tiny", 4), ("llama-tiny-tied", 12)] {
        let dir = fixture(&format!("{base}-lora"))?;
        let trainable = nn::VarStore::new(Device::Cpu);
        let inj = Injector::lora(&trainable, spec_from(&dir)?, TrainingFlag::default());
        let model = load_with(
            fixture(base)?.to_str().ok_or("path")?,
            Kind::Float,
            Device::Cpu,
            &inj,
        )?
        .backbone;
        assert_eq!(
            trainable.variables().len(),
            expect_adapters,
            "{base}: adapters created"
        );
        load_peft_adapter(&trainable, &dir.join("adapter_model.safetensors"))?;
        let r = reference(&format!("{base}-lora"))?;
        let d = max_abs_diff(
            &padded_logits(model.as_ref(), &r),
            &masked(&r, &r["logits"]),
        );
        assert!(d < 1e-4, "{base}: max |logit diff| vs PEFT {d:e}");
        // The adapters matter: the plain backbone is far from PEFT's output.
        let plain = load(
            fixture(base)?.to_str().ok_or("path")?,
            Kind::Float,
            Device::Cpu,
        )?
        .backbone;
        assert!(
            max_abs_diff(
                &padded_logits(plain.as_ref(), &r),
                &masked(&r, &r["logits"])
            ) > 1e-2
        );
    }
    Ok(())
}

#[test]
fn fresh_lora_starts_at_the_backbone_and_trains_only_adapters() -> TestResult {
    let name = "llama-tiny-untied";
    let r = reference(name)?;
    let trainable = nn::VarStore::new(Device::Cpu);
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.1,
        rslora: false,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let training = TrainingFlag::default();
    let inj = Injector::lora(&trainable, spec, training.clone());
    let model = load_with(
        fixture(name)?.to_str().ok_or("path")?,
        Kind::Float,
        Device::Cpu,
        &inj,
    )?
    .backbone;
    let plain = load(
        fixture(name)?.to_str().ok_or("path")?,
        Kind::Float,
        Device::Cpu,
    )?
    .backbone;
    let (with_lora, without) = tch::no_grad(|| {
        (
            padded_logits(model.as_ref(), &r),
            padded_logits(plain.as_ref(), &r),
        )
    });
    assert!(
        with_lora.equal(&without),
        "B = 0 must leave the output bitwise unchanged"
    );
    training.set(true);
    let loss = padded_logits(model.as_ref(), &r)
        .pow_tensor_scalar(2)
        .mean(Kind::Float);
    loss.backward();
    for (name, var) in trainable.variables() {
        let g = var.grad();
        assert!(g.defined(), "{name}: no gradient");
        if name.contains("lora_B") {
            assert!(
                g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name}: zero gradient"
            );
        }
    }
    for (name, var) in model.var_store().variables() {
        assert!(!var.grad().defined(), "frozen {name} got a gradient");
    }
    Ok(())
}

#[test]
fn adapter_file_errors_name_the_tensor() -> TestResult {
    let dir = fixture("gpt2-tiny-lora")?;
    let trainable = nn::VarStore::new(Device::Cpu);
    let mut spec = spec_from(&dir)?;
    spec.r = 2; // the file holds rank 4
    let inj = Injector::lora(&trainable, spec, TrainingFlag::default());
    let _model = load_with(
        fixture("gpt2-tiny")?.to_str().ok_or("path")?,
        Kind::Float,
        Device::Cpu,
        &inj,
    )?;
    let e = load_peft_adapter(&trainable, &dir.join("adapter_model.safetensors"))
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("lora_") && e.contains("shape"),
        "{e}"
    );
    Ok(())
}

/// LoRA computed in the backbone's dtype (bf16 here, f32 weights cast at use) stays about as
/// close to PEFT's f32 logits as the bf16 backbone itself is to transformers' f32 logits: bf16's
/// rounding (u = 2^-8) of a model whose trained adapters enlarge the activations. Measured: gpt2
/// 6.8e-2 vs the backbone's 6.7e-2, llama 0.365 vs 0.219 (1.66x); computing the adapter in f32
/// from an f32 copy of the input, as before, gave 9.0e-2 and 0.333 (1.34x, 1.52x). Asserted:
/// within 2x the backbone's error plus 1e-2; a wrong scale or dropout at evaluation is O(1) off.
#[test]
fn bf16_lora_is_as_close_to_peft_as_the_bf16_backbone() -> TestResult {
    let _g = tch::no_grad_guard();
    for base in ["gpt2-tiny", "llama-tiny-tied"] {
        let path = fixture(base)?;
        let path = path.to_str().ok_or("path")?;
        let dir = fixture(&format!("{base}-lora"))?;
        let trainable = nn::VarStore::new(Device::Cpu);
        let inj = Injector::lora(&trainable, spec_from(&dir)?, TrainingFlag::default());
        let model = load_with(path, Kind::BFloat16, Device::Cpu, &inj)?.backbone;
        load_peft_adapter(&trainable, &dir.join("adapter_model.safetensors"))?;
        let r = reference(&format!("{base}-lora"))?;
        let lora = max_abs_diff(
            &padded_logits(model.as_ref(), &r).to_kind(Kind::Float),
            &masked(&r, &r["logits"]),
        );
        let plain = load(path, Kind::BFloat16, Device::Cpu)?.backbone;
        let r0 = reference(base)?;
        let backbone = max_abs_diff(
            &padded_logits(plain.as_ref(), &r0).to_kind(Kind::Float),
            &masked(&r0, &r0["logits"]),
        );
        eprintln!("{base}: bf16 LoRA vs PEFT {lora:e}; bf16 backbone vs transformers {backbone:e}");
        assert!(
            lora <= 2.0 * backbone + 1e-2,
            "{base}: bf16 LoRA vs PEFT {lora:e} > 2 x {backbone:e} + 1e-2"
        );
    }
    Ok(())
}

#[test]
fn adapters_reading_one_input_share_its_dropout() {
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.5,
        rslora: false,
        targets: vec![],
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let training = TrainingFlag::default();
    training.set(true);
    let shared = std::sync::Arc::new(SharedDropout::default());
    let adapter = |name: &str, shared: std::sync::Arc<SharedDropout>| {
        let lora = LoraLinear::new(
            &(vs.root() / name),
            &spec,
            (16, 8),
            shared,
            training.clone(),
        );
        // Equal non-zero weights everywhere, so equal deltas mean equal masks.
        tch::no_grad(|| {
            let _ = lora.a.shallow_clone().fill_(0.1);
            let _ = lora.b.shallow_clone().fill_(0.1);
        });
        lora
    };
    let (q, k) = (adapter("q", shared.clone()), adapter("k", shared));
    let alone = adapter("o", std::sync::Arc::new(SharedDropout::default()));
    // A per-token input, so a different mask shows as a different delta.
    let x = Tensor::randn([3, 5, 16], (Kind::Float, Device::Cpu));
    let (dq, dk, d_alone) = (q.delta(&x), k.delta(&x), alone.delta(&x));
    assert!(dq.equal(&dk), "q and k read one input: one mask");
    assert!(
        !dq.equal(&d_alone),
        "an adapter on another input draws its own mask"
    );
    // Both readers took it, so it is let go: the next forward draws afresh.
    let again = q.delta(&x);
    assert!(
        !again.equal(&dq),
        "the shared dropout outlived its forward pass"
    );
    // An equal input in another tensor is not the held one: k draws its own mask for it.
    assert!(!k.delta(&x.copy()).equal(&again));
}
