//! Model references (local dirs, GGUF, the Hugging Face cache) and bad checkpoints, whose errors
//! name the tensor and the file.
mod common;
use common::process::umtune_bin;
use common::*;
use std::path::PathBuf;
use std::process::Command;
use tch::{Device, Kind, Tensor};
use umtune::models::resolve::load;

/// A copy of the tiny GPT-2 fixture whose tensors went through `edit`.
fn edited_gpt2(
    tag: &str,
    edit: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let src = fixture("gpt2-tiny")?;
    let dir = common::fresh_dir(&format!("load-{tag}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(src.join("config.json"), dir.join("config.json"))?;
    let mut tensors = Tensor::read_safetensors(src.join("model.safetensors"))?;
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
    Ok(dir)
}

fn load_err(dir: &std::path::Path) -> String {
    match load(dir.to_str().unwrap_or_default(), Kind::Float, Device::Cpu) {
        Ok(_) => panic!("expected {} to fail to load", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor() -> TestResult {
    let dir = edited_gpt2("missing", |t| {
        t.retain(|(n, _)| n != "transformer.h.1.mlp.c_fc.weight")
    })?;
    let e = load_err(&dir);
    assert!(
        e.contains("transformer.h.1.mlp.c_fc.weight")
            && e.contains("missing")
            && e.contains("model.safetensors"),
        "{e}"
    );
    Ok(())
}

#[test]
fn unexpected_tensor() -> TestResult {
    let dir = edited_gpt2("unexpected", |t| {
        t.push((
            "transformer.h.9.extra.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ))
    })?;
    let e = load_err(&dir);
    assert!(
        e.contains("transformer.h.9.extra.weight")
            && e.contains("unexpected")
            && e.contains("model.safetensors"),
        "{e}"
    );
    Ok(())
}

#[test]
fn misshaped_tensor() -> TestResult {
    let dir = edited_gpt2("shape", |t| {
        for (n, v) in t.iter_mut() {
            if n == "transformer.ln_f.weight" {
                *v = Tensor::ones([31], (Kind::Float, Device::Cpu));
            }
        }
    })?;
    let e = load_err(&dir);
    assert!(
        e.contains("transformer.ln_f.weight")
            && e.contains("[31]")
            && e.contains("[32]")
            && e.contains("model.safetensors"),
        "{e}"
    );
    Ok(())
}

#[test]
fn corrupt_files_are_named() -> TestResult {
    let dir = edited_gpt2("corrupt", |_| {})?;
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file")?;
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"bert\"}")?;
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("bert"), "{e}");
    let gguf = dir.join("bad.gguf");
    std::fs::write(&gguf, b"GGUF\x09\x00\x00\x00")?;
    let e = load_err(&gguf);
    assert!(e.contains("bad.gguf") && e.contains("version 9"), "{e}");
    Ok(())
}

/// Hub ids resolve through the local Hugging Face cache layout (`models--org--name/refs/main`
/// naming a snapshot); offline and uncached, the error says which file and where it looked. Run
/// as `umtune generate` processes with their own HF_HOME: setting it in this process would race
/// with the other tests' threads reading the environment.
#[test]
fn hub_ids_use_the_local_cache_and_explain_misses() -> TestResult {
    let home = common::fresh_dir("hf");
    let repo = home.join("hub").join("models--tiny-org--gpt2-tiny");
    let snapshot = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs").join("main"), "0123abcd")?;
    let src = fixture("gpt2-tiny")?;
    for file in [
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
    ] {
        std::fs::copy(src.join(file), snapshot.join(file))?;
    }
    let generate = |model: &str| {
        Command::new(umtune_bin())
            .args(["generate", "--model", model, "--prompt", "hello", "--ids"])
            .args(["--max-new-tokens", "2"])
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .output()
    };
    let found = generate("tiny-org/gpt2-tiny")?;
    let stderr = String::from_utf8_lossy(&found.stderr);
    assert!(found.status.success(), "{stderr}");
    let out: serde_json::Value = serde_json::from_slice(&found.stdout)?;
    assert!(out["generated_ids"].is_array(), "{out}");
    let missed = generate("openai-community/gpt2")?;
    let e = String::from_utf8_lossy(&missed.stderr);
    assert!(!missed.status.success());
    assert!(
        e.contains("openai-community/gpt2")
            && e.contains("config.json")
            && e.contains("models--openai-community--gpt2"),
        "{e}"
    );
    Ok(())
}

/// A task model leaves an untied LM head unread (classification and NER never use it), and loads
/// every other tensor as the plain backbone does; a tied head is the embedding either way.
#[test]
fn a_task_model_leaves_the_untied_lm_head_unread() -> TestResult {
    for (name, untied) in [("llama-tiny-untied", true), ("llama-tiny-tied", false)] {
        let dir = fixture(name)?;
        let plain = load(dir.to_str().ok_or("path")?, Kind::Float, Device::Cpu)?;
        let cfg = tiny_config_on(name, umtune::config::PeftMethod::Lora, &dir)?;
        let (task, _) = build_model(&cfg, 2)?;
        let arch = plain.backbone.arch();
        let head = (arch.vocab_size() * arch.hidden_size()) as i64;
        let saved = plain.backbone.num_parameters() - task.backbone.num_parameters();
        assert_eq!(saved, if untied { head } else { 0 }, "{name}");
    }
    Ok(())
}
