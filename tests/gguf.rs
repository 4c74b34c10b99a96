//! GGUF loading against transformers loading the same files: the packaged SmolLM2-135M (Q4_1/Q8_0;
//! logits on real sentences, greedy generation token for token, the tokenizer) and a tiny LLaMA
//! holding every supported tensor type.
mod common;
use common::*;
use tch::{Device, Kind, Tensor};
use umtune::models::gguf::{dequantize, GgmlType};
use umtune::models::resolve::{default_model_path, load};
use umtune::models::{generate, NoHook};

/// Measured: max |diff| 3.6e-5 to 5.1e-5 on logits of magnitude ~20. Both sides dequantize the
/// same blocks to f32 exactly, so what is left is f32 summation order over 30 layers.
const LOGIT_TOL: f64 = 5e-4;

fn sentences() -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    read_json(fixture("smollm2")?.join("generations.json"))
}

#[test]
fn logits_match_transformers_on_real_sentences() -> TestResult {
    let _g = tch::no_grad_guard();
    let model = load(
        default_model_path().to_str().ok_or("path")?,
        Kind::Float,
        Device::Cpu,
    )?;
    let r = reference("smollm2")?;
    let gens = sentences()?;
    let prompts = gens.as_object().ok_or("generations.json")?;
    assert_eq!(prompts.len(), 3);
    // Sentences are stored in file order; logits.{i} follows make_fixtures.py's order.
    for (i, sentence) in [
        "The capital of France is",
        "Once upon a time, there was a little girl who",
        "Water boils at 100 degrees Celsius because",
    ]
    .iter()
    .enumerate()
    {
        let ids: Vec<i64> = serde_json::from_value(prompts[*sentence]["prompt_ids"].clone())?;
        let input = Tensor::from_slice(&ids).unsqueeze(0);
        let logits = model
            .backbone
            .lm_logits(&model.backbone.forward(&input, None, None, &mut NoHook))
            .squeeze_dim(0);
        let reference = &r[&format!("logits.{i}")];
        let d = max_abs_diff(&logits, reference);
        eprintln!("{sentence:?}: max |logit diff| = {d:e}");
        assert!(d < LOGIT_TOL, "{sentence:?}: max |logit diff| {d:e}");
        assert_eq!(logits.argmax(-1, false), reference.argmax(-1, false));
    }
    Ok(())
}

#[test]
fn greedy_generation_equals_transformers() -> TestResult {
    let model = load("default", Kind::Float, Device::Cpu)?;
    let tok = model.tokenizer.as_ref().ok_or("tokenizer")?;
    for (sentence, expected) in sentences()?.as_object().ok_or("generations.json")? {
        let prompt: Vec<i64> = tok.encode(sentence)?.into_iter().map(i64::from).collect();
        let want_prompt: Vec<i64> = serde_json::from_value(expected["prompt_ids"].clone())?;
        assert_eq!(prompt, want_prompt, "prompt ids of {sentence:?}");
        let want: Vec<i64> = serde_json::from_value(expected["generated_ids"].clone())?;
        let got = generate::greedy(model.backbone.as_ref(), &prompt, want.len(), &[]);
        assert_eq!(got, want, "greedy continuation of {sentence:?}");
    }
    Ok(())
}

#[test]
fn gguf_tokenizer_matches_transformers() -> TestResult {
    let model = load("default", Kind::Float, Device::Cpu)?;
    let tok = model.tokenizer.as_ref().ok_or("tokenizer")?;
    let enc = read_json(fixture("smollm2")?.join("encodings.json"))?;
    for (text, ids) in enc.as_object().ok_or("encodings.json")? {
        let want: Vec<u32> = serde_json::from_value(ids.clone())?;
        assert_eq!(tok.encode(text)?, want, "encoding of {text:?}");
    }
    Ok(())
}

/// Block layouts against hand-computed values (ggml's reference dequantize_row_*).
#[test]
fn dequantize_blocks() {
    let d = half::f16::from_f32(0.5).to_le_bytes();
    let m = half::f16::from_f32(-1.0).to_le_bytes();
    // Q8_0: d, then 32 signed bytes.
    let mut q8 = d.to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
    assert_eq!(dequantize(GgmlType::Q8_0, &q8), want);
    // Q4_0: d, then 16 bytes; low nibbles are elements 0..16, high nibbles 16..32, minus 8.
    let mut q4 = d.to_vec();
    q4.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let out = dequantize(GgmlType::Q4_0, &q4);
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
    }
    // Q4_1: d, m, then 16 bytes: q * d + m.
    let mut q41 = d.to_vec();
    q41.extend(m);
    q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let out = dequantize(GgmlType::Q4_1, &q41);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.5 - 1.0);
        assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
    }
}

/// A tiny LLaMA that make_fixtures.py wrote to GGUF with every supported tensor type (F32, F16,
/// BF16, Q8_0, Q4_0, Q4_1) and llama.cpp's q/k permutation under grouped-query attention: umtune
/// equals transformers loading the same file, padded batch included.
#[test]
fn every_ggml_type_matches_transformers() -> TestResult {
    let _g = tch::no_grad_guard();
    let path = fixture("llama-tiny-gguf")?.join("tiny.gguf");
    let model = load(path.to_str().ok_or("path")?, Kind::Float, Device::Cpu)?;
    let r = reference("llama-tiny-gguf")?;
    let d = max_abs_diff(
        &padded_logits(model.backbone.as_ref(), &r),
        &masked(&r, &r["logits"]),
    );
    assert!(d < 1e-4, "max |logit diff| {d:e}");
    // The vocabulary came along as a byte-level BPE tokenizer.
    let tok = model.tokenizer.as_ref().ok_or("tokenizer")?;
    assert_eq!(tok.vocab_size(), model.backbone.arch().vocab_size());
    Ok(())
}
