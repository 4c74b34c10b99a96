//! `umtune plan`: what a training run will need on each rank, said before it starts, from the
//! same config and the same resolved model reference as `train` (shapes only: no weight is read).
//!
//! The bill: frozen weights (by dtype, or the linear layers by `model.quantize`, with 4 bits
//! counted as Q4_1's 0.625 bytes per weight; an untied LM head is not loaded by a task model), the
//! trainable tensors with their gradients and AdamW's two moments (f32), the memory bank (this
//! rank's shard), and the activations autograd keeps for one micro-batch, with and without
//! activation checkpointing, plus the largest transient (the backward of one block, and a
//! quantized base's dequantized layer). FLOPs per token follow the convention of NeMo's tables:
//! 4N for a frozen base (forward 2N, backward 2N for the input gradients), 6N for full
//! fine-tuning.
//!
//! The activation count per block is from the operations' saved tensors: for LLaMA, the two norms'
//! inputs and outputs, q/k after RoPE, SDPA's q, k, v and output (fused kernels keep no t x t
//! matrix), o_proj's input, the MLP's gate, up, SiLU and product; for each LoRA adapter its rank-r
//! intermediate, and with dropout one bool mask and one dropped copy per input (adapters reading
//! the same input share them); UM and the memory keep f32 tensors at their blocks. It is an
//! estimate: the allocator's caching and libtorch's workspaces come on top
//! (`bench/checkpointing.py` compares it with measured peaks).
use crate::config::{Config, OverrideArgs};
use crate::error::{Error, Result};
use crate::models::resolve::ModelRef;
use crate::models::ArchConfig;
use crate::peft::matches_target;
use crate::peft::targets::resolve_targets;
use std::fmt::Write;
use std::path::PathBuf;

/// `umtune plan`'s arguments.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// TOML experiment config.
    pub config: PathBuf,
    #[command(flatten)]
    pub overrides: OverrideArgs,
    /// Ranks the run is split over (the memory bank is sharded over them).
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// One GPU's memory (`80GB`, `141GiB`): the micro batch and checkpointing that fit it.
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// Classes of the head (default: `data.label_names`, else 2).
    #[arg(long)]
    pub num_labels: Option<usize>,
    /// Print the figures as one JSON object (bytes) instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl PlanArgs {
    pub fn config_args(&self) -> crate::config::ConfigArgs {
        crate::config::ConfigArgs::file(&self.config, &self.overrides)
    }
}

/// One linear layer of a block: its module path, what it reads (layers reading the same tensor
/// share LoRA's dropout of it), input and output widths.
struct Linear {
    module: String,
    input: &'static str,
    n_in: u64,
    n_out: u64,
}

/// The shapes the bill is made of.
struct Shapes {
    layers: u64,
    d: u64,
    /// Per block: the linear layers, and the other (norm, bias) parameters.
    linears: Vec<Vec<Linear>>,
    other_per_block: u64,
    /// Embeddings and final norm (what a task model loads besides the blocks).
    outside: u64,
    /// Saved activation elements per token of a plain block (no adapters).
    saved_per_token: u64,
}

fn shapes(arch: &ArchConfig) -> Shapes {
    match arch {
        ArchConfig::Llama(c) => {
            let (d, i) = (c.hidden_size as u64, c.intermediate_size as u64);
            let q = (c.num_attention_heads * c.head_dim) as u64;
            let kv = (c.num_key_value_heads * c.head_dim) as u64;
            let linears = (0..c.num_hidden_layers)
                .map(|l| {
                    let m = |name: &str, input, n_in, n_out| Linear {
                        module: format!("model.layers.{l}.{name}"),
                        input,
                        n_in,
                        n_out,
                    };
                    vec![
                        m("self_attn.q_proj", "attn norm", d, q),
                        m("self_attn.k_proj", "attn norm", d, kv),
                        m("self_attn.v_proj", "attn norm", d, kv),
                        m("self_attn.o_proj", "attention", q, d),
                        m("mlp.gate_proj", "mlp norm", d, i),
                        m("mlp.up_proj", "mlp norm", d, i),
                        m("mlp.down_proj", "act", i, d),
                    ]
                })
                .collect();
            let bias = if c.attention_bias { q + 2 * kv + d } else { 0 }
                + if c.mlp_bias { 2 * i + d } else { 0 };
            Shapes {
                layers: c.num_hidden_layers as u64,
                d,
                linears,
                other_per_block: 2 * d + bias,
                outside: c.vocab_size as u64 * d + d,
                // norm in, normed, SDPA's q k v (after RoPE, which keeps only cos/sin) and out,
                // o_proj in, norm in, normed, gate, up, silu, product
                saved_per_token: d + d + (q + 2 * kv + q) + q + d + d + 4 * i,
            }
        }
        ArchConfig::Gpt2(c) => {
            let (d, i) = (c.n_embd as u64, c.inner() as u64);
            let linears = (0..c.n_layer)
                .map(|l| {
                    let m = |name: &str, input, n_in, n_out| Linear {
                        module: format!("transformer.h.{l}.{name}"),
                        input,
                        n_in,
                        n_out,
                    };
                    vec![
                        m("attn.c_attn", "ln_1", d, 3 * d),
                        m("attn.c_proj", "attention", d, d),
                        m("mlp.c_fc", "ln_2", d, i),
                        m("mlp.c_proj", "act", i, d),
                    ]
                })
                .collect();
            Shapes {
                layers: c.n_layer as u64,
                d,
                linears,
                other_per_block: 4 * d + 3 * d + d + i + d,
                outside: (c.vocab_size + c.n_positions) as u64 * d + 2 * d,
                // ln in, normed, qkv, sdpa out (+ q k v copies), c_proj in, ln in, normed, fc out,
                // gelu out
                saved_per_token: d + d + 3 * d + 4 * d + d + d + d + i + i,
            }
        }
    }
}

/// The shapes of LoRA's trainable tensors on the model `cfg` describes (`lora_A (r, n_in)` and
/// `lora_B (n_out, r)` of every targeted linear layer, block by block), then the classification
/// head's `(num_labels, d)`: the optimizer's parameter set, without building the model.
pub fn lora_parameter_shapes(cfg: &Config, num_labels: usize) -> Result<Vec<[i64; 2]>> {
    let model = ModelRef::resolve(&cfg.model.source)?;
    let s = shapes(&model.arch);
    let targets = resolve_targets(
        &cfg.peft.targets,
        crate::config::PeftMethod::Lora,
        &model.arch,
    );
    let r = cfg.peft.r;
    let mut out: Vec<[i64; 2]> = s
        .linears
        .iter()
        .flatten()
        .filter(|l| matches_target(&l.module, &targets))
        .flat_map(|l| [[r, l.n_in as i64], [l.n_out as i64, r]])
        .collect();
    out.push([num_labels as i64, s.d as i64]);
    Ok(out)
}

/// What the run needs per rank.
pub struct Plan {
    pub frozen_params: u64,
    /// Bytes of the frozen weights (the first entries of `fixed`).
    pub frozen_bytes: u64,
    pub trainable_params: u64,
    /// (what, bytes), the fixed part.
    pub fixed: Vec<(String, u64)>,
    /// Activations of one micro-batch: without checkpointing, and with `train.activation_checkpointing`
    /// as configured (or `true` if off).
    pub activations_plain: u64,
    pub activations_checkpointed: u64,
    pub checkpointing_every: usize,
    pub largest_transient: u64,
    pub flops_per_token: f64,
    pub tokens_per_micro_batch: u64,
}

impl Plan {
    pub fn fixed_bytes(&self) -> u64 {
        self.fixed.iter().map(|(_, b)| b).sum()
    }

    /// The peak of one rank, with checkpointing on or off.
    pub fn peak(&self, checkpointed: bool) -> u64 {
        let act = match checkpointed {
            true => self.activations_checkpointed,
            false => self.activations_plain,
        };
        self.fixed_bytes() + act + self.largest_transient
    }
}

/// The bill of `cfg` on `world_size` ranks for a head of `num_labels` classes.
pub fn plan(cfg: &Config, world_size: usize, num_labels: usize) -> Result<Plan> {
    let model = ModelRef::resolve(&cfg.model.source)?;
    let arch = &model.arch;
    let s = shapes(arch);
    let e = match cfg.model.dtype.kind() {
        tch::Kind::Float => 4,
        _ => 2,
    };
    let (b, t) = (cfg.train.batch_size as u64, cfg.data.max_length as u64);
    let tokens = b * t;
    let linear_params: u64 = s.linears.iter().flatten().map(|l| l.n_in * l.n_out).sum();
    let frozen_params = s.outside + s.layers * s.other_per_block + linear_params;
    // Trainable: the adapters (LoRA counted here; other methods by their layout), the head, UM.
    let targets = resolve_targets(&cfg.peft.targets, cfg.peft.method, arch);
    let r = cfg.peft.r as u64;
    let lora = cfg.peft.method == crate::config::PeftMethod::Lora;
    let adapted = |l: &Linear| lora && matches_target(&l.module, &targets);
    let lora_params: u64 = s
        .linears
        .iter()
        .flatten()
        .filter(|l| adapted(l))
        .map(|l| r * (l.n_in + l.n_out))
        .sum();
    let d = s.d;
    // The head and UM's modules are small: built on the CPU and counted.
    let small = tch::nn::VarStore::new(tch::Device::Cpu);
    let root = small.root();
    let n = num_labels as i64;
    match cfg.data.task {
        crate::config::TaskKind::Classification => {
            crate::heads::SequenceClassifier::new(&root, d as i64, n);
        }
        crate::config::TaskKind::Ner => {
            let name = crate::heads::head_name(cfg.data.task, arch);
            crate::heads::TokenClassifier::new(&root, name, d as i64, n);
        }
    }
    if cfg.uncertainty.enabled {
        let layers = crate::uncertainty::plugin_layers(&cfg.uncertainty, s.layers as usize);
        crate::uncertainty::Uncertainty::new(&root, &cfg.uncertainty, &layers, d as i64);
    }
    let head_and_um: u64 = small.variables().values().map(|t| t.numel() as u64).sum();
    let um_layers = if cfg.uncertainty.enabled {
        crate::uncertainty::plugin_layers(&cfg.uncertainty, s.layers as usize).len() as u64
    } else {
        0
    };
    let m = &cfg.memory;
    let key = m.key_size as u64;
    // The gate reads UM's p when UM has an estimator at the memory's block.
    let memory_layer = if m.layer < 0 {
        s.layers as usize - 1
    } else {
        m.layer as usize
    };
    let with_um_gate = cfg.uncertainty.enabled
        && crate::uncertainty::plugin_layers(&cfg.uncertainty, s.layers as usize)
            .contains(&memory_layer);
    let gate_in = if with_um_gate { 3 * d } else { 2 * d };
    let memory_params = match m.enabled {
        true => 2 * d * key + gate_in * d + d + d * d,
        false => 0,
    };
    let trainable_params = match cfg.peft.method {
        crate::config::PeftMethod::Full => frozen_params,
        _ => lora_params,
    } + head_and_um
        + memory_params;
    let local_entries = match m.enabled {
        true => (m.capacity as u64).div_ceil(world_size.max(1) as u64),
        false => 0,
    };
    let bits = cfg.model.quantize.bits();
    let mut fixed = match bits {
        None => vec![(
            format!("frozen weights ({} params, {e} bytes each)", frozen_params),
            frozen_params * e,
        )],
        Some(bits) => {
            let per = crate::models::quant::bytes_per_param(bits);
            vec![
                (
                    format!(
                        "frozen linear layers ({linear_params} params, {}, {per} bytes each)",
                        cfg.model.quantize.as_str()
                    ),
                    (linear_params as f64 * per).ceil() as u64,
                ),
                (
                    format!(
                        "other frozen weights ({} params, {e} bytes each)",
                        frozen_params - linear_params
                    ),
                    (frozen_params - linear_params) * e,
                ),
            ]
        }
    };
    let frozen_bytes = fixed.iter().map(|(_, b)| b).sum();
    fixed.extend([
        (
            format!("trainable tensors ({trainable_params} params, f32)"),
            trainable_params * 4,
        ),
        ("their gradients (f32)".to_string(), trainable_params * 4),
        ("AdamW moments (2 x f32)".to_string(), trainable_params * 8),
    ]);
    if m.enabled {
        fixed.push((
            format!(
                "memory bank ({local_entries} entries on this rank, {} keys, f32 values)",
                m.key_dtype.kind_name()
            ),
            local_entries * (key * m.key_dtype.bytes() + d * 4 + 8),
        ));
    }
    // LoRA's saved bytes per token of a block: each adapter's rank-r intermediate and, with
    // dropout, one bool mask and one dropped copy per input its adapters read (shared).
    let dropout = cfg.peft.dropout > 0.0;
    let lora_saved = |block: &[Linear]| -> u64 {
        let adapters = block.iter().filter(|l| adapted(l));
        let mut inputs: Vec<(&str, u64)> = adapters.clone().map(|l| (l.input, l.n_in)).collect();
        inputs.sort();
        inputs.dedup();
        let dropped: u64 = inputs.iter().map(|(_, n_in)| n_in * (e + 1)).sum();
        adapters.count() as u64 * r * e + if dropout { dropped } else { 0 }
    };
    let per_block: Vec<u64> = s
        .linears
        .iter()
        .map(|block| (s.saved_per_token * e + lora_saved(block)) * tokens)
        .collect();
    // UM keeps ~7 f32 (b, t, d) tensors at each of its blocks; the memory ~6 at its block.
    let plug = tokens * d * 4 * (7 * um_layers + if m.enabled { 6 } else { 0 });
    let plugged = {
        let first_um = cfg
            .uncertainty
            .enabled
            .then(|| crate::uncertainty::plugin_layers(&cfg.uncertainty, s.layers as usize))
            .and_then(|layers| layers.first().copied());
        let mem_layer = m.enabled.then_some(memory_layer);
        [first_um, mem_layer]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(s.layers as usize)
    };
    let every = cfg.train.activation_checkpointing.every().unwrap_or(1);
    let activations_plain = per_block.iter().sum::<u64>() + plug;
    let activations_checkpointed = per_block
        .iter()
        .enumerate()
        .map(|(i, &a)| match i < plugged && i % every == 0 {
            true => tokens * d * e,
            false => a,
        })
        .sum::<u64>()
        + plug;
    // A quantized layer's dequantization at use: its values in f32, then in the working dtype.
    let dequantized = match bits {
        Some(_) => (s.linears.iter().flatten())
            .map(|l| l.n_in * l.n_out * (4 + e))
            .max()
            .unwrap_or(0),
        None => 0,
    };
    let largest_transient = per_block.iter().copied().max().unwrap_or(0) + dequantized;
    let n = frozen_params as f64;
    let flops_per_token = match cfg.peft.method {
        crate::config::PeftMethod::Full => 6.0 * n,
        _ => 4.0 * n,
    };
    Ok(Plan {
        frozen_params,
        frozen_bytes,
        trainable_params,
        fixed,
        activations_plain,
        activations_checkpointed,
        checkpointing_every: every,
        largest_transient,
        flops_per_token,
        tokens_per_micro_batch: tokens,
    })
}

/// `80GB`, `80G`, `141GiB`, `80000MB`: bytes (GB and GiB both read as 2^30, as GPUs are sold).
pub fn parse_memory(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_lowercase();
    let (num, unit) = t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
    let scale = match unit.trim() {
        "" | "gb" | "g" | "gib" => 1u64 << 30,
        "mb" | "m" | "mib" => 1 << 20,
        "tb" | "t" | "tib" => 1 << 40,
        _ => 0,
    };
    match (num.trim().parse::<f64>(), scale) {
        (Ok(v), s) if s > 0 && v > 0.0 => Ok((v * s as f64) as u64),
        _ => Err(Error::Config(format!(
            "size `{text}`: write one such as 80GB, 141GiB or 500MB"
        ))),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The plan as text: the bill, and with `gpu_memory` the largest micro batch that fits in 90% of
/// it without and with checkpointing.
pub fn report(cfg: &Config, args: &PlanArgs) -> Result<String> {
    let labels = args
        .num_labels
        .unwrap_or_else(|| cfg.data.label_names.len().max(2));
    let p = plan(cfg, args.world_size, labels)?;
    if args.json {
        let fixed: serde_json::Map<String, serde_json::Value> = p
            .fixed
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect();
        return Ok(format!(
            "{}\n",
            serde_json::json!({
                "frozen_params": p.frozen_params, "frozen_bytes": p.frozen_bytes,
                "trainable_params": p.trainable_params,
                "fixed": fixed, "activations_plain": p.activations_plain,
                "activations_checkpointed": p.activations_checkpointed,
                "checkpointing_every": p.checkpointing_every,
                "largest_transient": p.largest_transient,
                "peak_plain": p.peak(false), "peak_checkpointed": p.peak(true),
                "flops_per_token": p.flops_per_token,
            })
        ));
    }
    let mut out = String::new();
    let w = |out: &mut String, what: &str, bytes: u64| {
        let _ = writeln!(out, "  {:<64} {:>12}", what, gib(bytes));
    };
    let _ = writeln!(
        out,
        "{} ({}{}), {} x {} tokens per micro-batch, {} rank(s): per rank",
        cfg.model.source,
        cfg.model.dtype.as_str(),
        match cfg.model.quantize.bits() {
            Some(_) => format!(", linear layers {}", cfg.model.quantize.as_str()),
            None => String::new(),
        },
        cfg.train.batch_size,
        cfg.data.max_length,
        args.world_size
    );
    for (what, bytes) in &p.fixed {
        w(&mut out, what, *bytes);
    }
    w(
        &mut out,
        "activations, no checkpointing",
        p.activations_plain,
    );
    w(
        &mut out,
        &format!(
            "activations, checkpointing every {} block(s)",
            p.checkpointing_every
        ),
        p.activations_checkpointed,
    );
    w(
        &mut out,
        "largest transient (one block's backward)",
        p.largest_transient,
    );
    w(&mut out, "peak, no checkpointing", p.peak(false));
    w(&mut out, "peak, with checkpointing", p.peak(true));
    let _ = writeln!(
        out,
        "  FLOPs per token: {:.3e} ({}N, N = {} frozen params); per micro-batch {:.3e}",
        p.flops_per_token,
        if cfg.peft.method == crate::config::PeftMethod::Full {
            6
        } else {
            4
        },
        p.frozen_params,
        p.flops_per_token * p.tokens_per_micro_batch as f64
    );
    if let Some(mem) = &args.gpu_memory {
        let budget = (parse_memory(mem)? as f64 * 0.9) as u64;
        for checkpointed in [false, true] {
            let fits = (0..=10)
                .map(|k| 1usize << k)
                .filter(|&b| {
                    let mut c = cfg.clone();
                    c.train.batch_size = b;
                    if checkpointed && c.train.activation_checkpointing.every().is_none() {
                        c.train.activation_checkpointing = crate::config::Checkpointing(1);
                    }
                    plan(&c, args.world_size, labels).is_ok_and(|p| p.peak(checkpointed) <= budget)
                })
                .max();
            let how = if checkpointed { "with" } else { "without" };
            let _ = match fits {
                Some(b) => writeln!(
                    out,
                    "  fits {mem} (90%) {how} checkpointing: micro batch {b} (x {} tokens)",
                    cfg.data.max_length
                ),
                None => writeln!(
                    out,
                    "  does not fit {mem} (90%) {how} checkpointing even at micro batch 1"
                ),
            };
        }
    }
    Ok(out)
}
