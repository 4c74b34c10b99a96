//! `umtune plan` counts what the trainer builds: the frozen parameters a task model loads and the
//! trainable parameters (LoRA, the head, UM's estimators and head, the memory's projections and
//! gate) are exactly the built model's, on GPT-2 and LLaMA test models with every part on; so are
//! the frozen weights' bytes, dense and quantized.
mod common;

use common::{build_model, fixture, tiny_config_on};
use umtune::config::{Config, PeftMethod};
use umtune::train::plan::plan;

fn with(cfg: &Config, sets: &[&str]) -> Config {
    let mut overrides = cfg.overrides.0.clone();
    overrides.extend(sets.iter().map(|s| s.to_string()));
    Config::load(None, &overrides).unwrap()
}

#[test]
fn the_plan_counts_the_parameters_the_trainer_builds() -> Result<(), Box<dyn std::error::Error>> {
    let llama = fixture("llama-tiny-gguf")?.join("tiny.gguf");
    let gpt2 = fixture("gpt2-tiny")?;
    for (name, model, targets) in [
        (
            "llama",
            llama.as_path(),
            r#"peft.targets=["q_proj", "v_proj", "down_proj"]"#,
        ),
        (
            "gpt2",
            gpt2.as_path(),
            r#"peft.targets=["c_attn", "mlp.c_proj"]"#,
        ),
    ] {
        let base = tiny_config_on(&format!("plan-{name}"), PeftMethod::Lora, model)?;
        for parts in [
            &["uncertainty.enabled=false", "memory.enabled=false"][..],
            &[
                "uncertainty.enabled=true",
                "memory.enabled=true",
                "memory.capacity=64",
            ][..],
            // The gate without UM's input: the memory on a block without an estimator.
            &[
                "uncertainty.enabled=true",
                "uncertainty.layers=[1]",
                "memory.enabled=true",
                "memory.layer=0",
            ][..],
        ] {
            let mut sets = parts.to_vec();
            sets.push(targets);
            let cfg = with(&base, &sets);
            let (task, _) = build_model(&cfg, 3)?;
            let p = plan(&cfg, 1, 3)?;
            assert_eq!(
                p.frozen_params as i64,
                task.backbone.num_parameters(),
                "{name} {parts:?}: frozen parameters"
            );
            assert_eq!(
                p.trainable_params as i64,
                task.trainable_params(),
                "{name} {parts:?}: trainable parameters"
            );
        }
        // The frozen weights' bytes, dense and quantized: exact where every layer is quantized at
        // load; an upper bound where a GGUF file's Q4_0 blocks (no mins) are taken as they are.
        for quantize in ["none", "int8", "q4"] {
            let cfg = with(&base, &[&format!("model.quantize={quantize}")]);
            let (task, _) = build_model(&cfg, 3)?;
            let (planned, built) = (plan(&cfg, 1, 3)?.frozen_bytes, task.backbone.weight_bytes());
            match (name, quantize) {
                ("llama", "q4") => assert!(
                    built < planned && planned - built < planned / 20,
                    "{name} {quantize}: planned {planned} bytes, built {built}"
                ),
                _ => assert_eq!(planned, built, "{name} {quantize}: frozen bytes"),
            }
        }
    }
    Ok(())
}
