//! The quantized frozen base (`model.quantize`): blocks round-trip within half a step, a GGUF
//! file's blocks are taken exactly as its dense loader reads them, the quantized layer's forward
//! and input gradient equal the dense layer's on the dequantized weight, SmolLM2's logits equal
//! those of the model built from its dequantized weights, and LoRA trains over a quantized base.
mod common;
use common::*;
use tch::{Device, Kind, Tensor};
use umtune::config::{PeftMethod, Quantize};
use umtune::models::adapt::NoAdapters;
use umtune::models::attention::BatchMask;
use umtune::models::gguf::GgufFile;
use umtune::models::gguf_source::GgufSource;
use umtune::models::quant::{QuantWeight, BLOCK};
use umtune::models::resolve::default_model_path;
use umtune::models::weights::{Loader, WeightSource};
use umtune::models::{build, Backbone, NoHook};

/// f32 unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// Wraps a source so that every linear layer's weight arrives as `dequantize(quantize(W))`, the
/// way a quantized base holds it (blocks the file stores in the layout are taken as they are):
/// the dense model a quantized one must equal.
struct Dequantized {
    inner: GgufSource,
    bits: i64,
}

impl WeightSource for Dequantized {
    fn take(
        &mut self,
        name: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
    ) -> umtune::Result<Tensor> {
        if !name.ends_with("_proj.weight") {
            return self.inner.take(name, shape, kind, device);
        }
        let q = match self.inner.take_quantized(name, shape, self.bits, device)? {
            Some(q) => q,
            None => QuantWeight::quantize(
                &self.inner.take(name, shape, Kind::Float, device)?,
                self.bits,
            ),
        };
        Ok(q.dequantize(kind))
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn skip(&mut self, name: &str) {
        self.inner.skip(name)
    }
    fn finish(&mut self) -> umtune::Result<()> {
        self.inner.finish()
    }
}

fn gguf_source(path: &std::path::Path) -> Result<GgufSource, Box<dyn std::error::Error>> {
    Ok(GgufSource::new(GgufFile::open(path)?)?)
}

/// The backbone of `path` in f32 on the CPU, its linear layers held as `quantize` says, or (with
/// `dequantized`) dense with the weights a quantized model would multiply by.
fn backbone(
    path: &std::path::Path,
    quantize: Quantize,
    dequantized: bool,
) -> Result<Box<dyn Backbone>, Box<dyn std::error::Error>> {
    let arch = GgufFile::open(path)?.arch_config()?;
    let mut plain = gguf_source(path)?;
    let mut wrapped;
    let (weights, quantize): (&mut dyn WeightSource, Quantize) = match dequantized {
        false => (&mut plain, quantize),
        true => {
            let bits = quantize.bits().ok_or("a quantization")?;
            wrapped = Dequantized {
                inner: gguf_source(path)?,
                bits,
            };
            (&mut wrapped, Quantize::None)
        }
    };
    let mut loader = Loader {
        weights,
        kind: Kind::Float,
        quantize,
        adapters: &NoAdapters,
        quantized: Default::default(),
    };
    Ok(build(&arch, &mut loader, Device::Cpu, true)?)
}

/// Rows of weights with block scales from 1e-3 to 10 and one all-zero block.
fn weights() -> Tensor {
    tch::manual_seed(3);
    let scales = Tensor::logspace(-3.0, 1.0, 8, 10.0, (Kind::Float, Device::Cpu));
    let w = Tensor::randn([8, 4 * BLOCK], (Kind::Float, Device::Cpu)) * scales.unsqueeze(1);
    let _ = w.narrow(0, 2, 1).narrow(1, BLOCK, BLOCK).fill_(0.0);
    w
}

#[test]
fn blocks_round_trip_within_half_a_step() {
    let w = weights();
    let blocks = w.view([8, 4, BLOCK]);
    for bits in [8, 4] {
        let back = QuantWeight::quantize(&w, bits).dequantize(Kind::Float);
        let err = (&back - &w).abs().view([8, 4, BLOCK]).amax(-1, false);
        let (lo, hi) = (blocks.amin(-1, false), blocks.amax(-1, false));
        // Rounding to nearest leaves half a step; the step and (4 bits) the offset are stored in
        // f16 (relative error 2^-11 each), which can move the grid's ends by 15 steps' rounding
        // (4 bits: the top of the range is min + 15 d) or 127 steps' (int8), and the min's.
        let bound = match bits {
            8 => {
                let d = blocks.abs().amax(-1, false) / 127.0;
                &d * 0.5 + &d * (127.0 * 2f64.powi(-11)) + 1e-12
            }
            _ => {
                let d = (&hi - &lo) / 15.0;
                &d * 0.5 + &d * (15.0 * 2f64.powi(-11)) + lo.abs() * 2f64.powi(-11) + 1e-12
            }
        };
        let excess = (&err - &bound).max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "{bits} bits: error over the bound by {excess:e}"
        );
        // The zero block stays exactly zero; the bound is not vacuous (errors are a sizeable part
        // of it).
        assert_eq!(
            back.narrow(0, 2, 1)
                .narrow(1, BLOCK, BLOCK)
                .abs()
                .max()
                .double_value(&[]),
            0.0
        );
        let used = (&err / (&bound + 1e-30)).max().double_value(&[]);
        assert!(
            used > 0.3,
            "{bits} bits: the error uses only {used} of its bound"
        );
    }
}

#[test]
fn gguf_blocks_are_taken_as_the_dense_loader_reads_them() -> TestResult {
    // The tiny LLaMA holds q (Q4_0, rows permuted), k (Q4_1, permuted) and v (Q8_0).
    let path = fixture("llama-tiny-gguf")?.join("tiny.gguf");
    let mut source = gguf_source(&path)?;
    let layer = "model.layers.1.self_attn";
    for (module, shape, bits) in [
        ("q_proj", [64, 64], 4),
        ("k_proj", [32, 64], 4),
        ("v_proj", [32, 64], 8),
    ] {
        let name = format!("{layer}.{module}.weight");
        let dense = source.take(&name, &shape, Kind::Float, Device::Cpu)?;
        let blocks = source
            .take_quantized(&name, &shape, bits, Device::Cpu)?
            .ok_or(format!("{name}: not taken as blocks"))?;
        // The same f32 arithmetic (value * scale, + min) on the same f16 numbers: exact.
        assert_eq!(
            max_abs_diff(&blocks.dequantize(Kind::Float), &dense),
            0.0,
            "{name}"
        );
        // A type of the other width is not taken as blocks.
        let other = 12 - bits;
        assert!(
            source
                .take_quantized(&name, &shape, other, Device::Cpu)?
                .is_none(),
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn quantized_linear_equals_the_dense_layer_on_its_weights() {
    let w = weights();
    let k = w.size()[1];
    for bits in [8, 4] {
        let q = QuantWeight::quantize(&w, bits);
        let dense = q.dequantize(Kind::Float);
        let x = Tensor::randn([2, 5, k], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let g = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let y = q.linear(&x);
        (&y * &g).sum(Kind::Float).backward();
        let gx = x.grad().copy();
        let _ = x.grad().zero_();
        let y_ref = x.linear::<&Tensor>(&dense, None);
        (&y_ref * &g).sum(Kind::Float).backward();
        // Both sides run the same GEMM on the same values; should a kernel sum in another order,
        // each output differs by at most k u sum |a_i b_i| (the dot product's rounding bound).
        let check = |what: &str, a: &Tensor, b: &Tensor, bound: Tensor| {
            let excess = ((a - b).abs() - bound * (k as f64 * U))
                .max()
                .double_value(&[]);
            assert!(
                excess <= 0.0,
                "{bits} bits, {what}: over the bound by {excess:e}"
            );
        };
        let _g = tch::no_grad_guard();
        check(
            "output",
            &y,
            &y_ref,
            x.abs().linear::<&Tensor>(&dense.abs(), None),
        );
        check(
            "input gradient",
            &gx,
            &x.grad(),
            g.abs().matmul(&dense.abs()),
        );
        assert!(gx.abs().max().double_value(&[]) > 0.0);
    }
}

/// Measured (this machine): 0 for both widths (the same values through the same kernels).
/// Allowed: what summation order leaves over 30 layers (tests/gguf.rs measured 5e-5 against
/// transformers on these logits, of magnitude ~20).
const LOGIT_TOL: f64 = 5e-4;

#[test]
fn smollm2_logits_equal_the_dequantized_model() -> TestResult {
    let _g = tch::no_grad_guard();
    let path = default_model_path();
    let ids = Tensor::from_slice(&[504i64, 3575, 282, 4649, 314, 260, 1345, 2330]).unsqueeze(0);
    let logits = |m: &dyn Backbone| m.lm_logits(&m.forward(&ids, None, None, &mut NoHook));
    let full = logits(backbone(&path, Quantize::None, false)?.as_ref());
    for quantize in [Quantize::Int8, Quantize::Q4] {
        let q = backbone(&path, quantize, false)?;
        assert!(q.quantized().params > 0);
        let got = logits(q.as_ref());
        let reference = logits(backbone(&path, quantize, true)?.as_ref());
        let d = max_abs_diff(&got, &reference);
        // How far quantization itself moves them, for the record (not a bound of this test).
        let moved = (&got - &full)
            .square()
            .mean(Kind::Float)
            .sqrt()
            .double_value(&[])
            / full.square().mean(Kind::Float).sqrt().double_value(&[]);
        let agree = got.argmax(-1, false).eq_tensor(&full.argmax(-1, false));
        let agree = agree
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        eprintln!(
            "{}: max |diff| to the dequantized model {d:e}; RMS change from the f32 model {moved:.4} of the logits' RMS, next-token agreement {agree:.3}",
            quantize.as_str()
        );
        assert!(d <= LOGIT_TOL, "{}: {d:e}", quantize.as_str());
    }
    Ok(())
}

#[test]
fn input_gradients_through_the_quantized_stack_equal_the_dense_ones() -> TestResult {
    // Through every layer's custom backward (the tiny LLaMA, q4: taken Q4_0/Q4_1 blocks and
    // blocks quantized at load) against autograd's on the dequantized weights.
    let path = fixture("llama-tiny-gguf")?.join("tiny.gguf");
    let ids = Tensor::from_slice(&[5i64, 17, 99, 3, 42, 7]).view([2, 3]);
    let grads: Vec<Tensor> = [false, true]
        .into_iter()
        .map(
            |dequantized| -> Result<Tensor, Box<dyn std::error::Error>> {
                let m = backbone(&path, Quantize::Q4, dequantized)?;
                let batch = BatchMask::new(&ids, None, None);
                let x = m.embed(&ids, &batch).detach().set_requires_grad(true);
                let n = m.arch().num_layers();
                let h = m.final_norm(&m.blocks(x.shallow_clone(), &batch, 0..n, &mut NoHook));
                h.square().sum(Kind::Float).backward();
                Ok(x.grad())
            },
        )
        .collect::<Result<_, _>>()?;
    let scale = grads[1].abs().max().double_value(&[]);
    assert!(scale > 0.0);
    // Equal up to f32 summation order through two blocks (~1e-6 of the scale, measured 0).
    assert_close("input gradient", &grads[0], &grads[1], 1e-5 * scale);
    Ok(())
}

#[test]
fn lora_trains_over_a_quantized_base() -> TestResult {
    for (tag, quantize, model) in [
        (
            "q4-llama",
            "q4",
            fixture("llama-tiny-gguf")?.join("tiny.gguf"),
        ),
        ("int8-gpt2", "int8", fixture("gpt2-tiny")?),
    ] {
        let mut cfg = tiny_config_on(tag, PeftMethod::Lora, &model)?;
        cfg.model.quantize = match quantize {
            "q4" => Quantize::Q4,
            _ => Quantize::Int8,
        };
        let (model, _) = build_model(&cfg, 2)?;
        assert!(model.backbone.quantized().params > 0, "{tag}");
        let ids = Tensor::from_slice(&[5i64, 17, 99, 3, 42, 7, 8, 9]).view([2, 4]);
        let mask = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1]);
        // Every adapter gets a gradient, the first layer's through the quantized layers above.
        assert_gradients_reach(&model, (&ids, &mask, &labels), None, |n| {
            n.contains("lora_")
        })?;
        let loss = |m: &umtune::task::TaskModel| -> Result<f64, Box<dyn std::error::Error>> {
            let _g = tch::no_grad_guard();
            Ok(m.loss(&m.forward(&ids, &mask, None)?, &labels)
                .double_value(&[]))
        };
        model.training.set(false); // no dropout: a deterministic descent
        let before = loss(&model)?;
        let mut opt = umtune::train::optimizer::AdamW::new(model.named_trainable(), 0.0);
        for _ in 0..20 {
            opt.zero_grad();
            let f = model.forward(&ids, &mask, None)?;
            model.loss(&f, &labels).backward();
            opt.step(1e-2);
        }
        let after = loss(&model)?;
        assert!(after < 0.5 * before, "{tag}: loss {before} -> {after}");
    }
    Ok(())
}
