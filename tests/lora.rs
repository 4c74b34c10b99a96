//! LoRA against Hugging Face PEFT: adapters with random A and B (PEFT's init_lora_weights=False)
//! loaded into umtune give PEFT's logits; fresh adapters leave the backbone's output untouched;
//! gradients reach the adapters and nothing else.
mod common;
use common::*;
use tch::{nn, Device, Kind};
use umtune::models::resolve::{load, load_with};
use umtune::peft::{load_peft_adapter, Injector, LoraSpec, TrainingFlag};

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
