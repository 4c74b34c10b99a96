//! LLaMA-3 (Grattafiori et al. 2024) as Hugging Face `LlamaForCausalLM` computes it: RMSNorm,
//! rotary positions with the `llama3` frequency rule, grouped-query attention, SwiGLU MLP, tied or
//! untied embeddings. Parameter paths equal the `transformers` safetensors keys.
use super::adapt::LinearAdapter;
use super::attention::{append_cache, sdpa, BatchMask};
use super::hf_config::{ArchConfig, LlamaConfig};
use super::quant::{FrozenWeight, Quantized};
use super::weights::Loader;
use super::{Backbone, KvCache, LayerHook};
use crate::error::Result;
use std::f64::consts::PI;
use tch::{nn, Kind, Tensor};

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: &nn::Path, l: &mut Loader, d: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: l.param(p, "weight", &[d])?,
            eps,
        })
    }
    /// `LlamaRMSNorm`: statistics in f32, the product with the weight in the working dtype. In
    /// f32 that is exactly libtorch's fused kernel (one pass instead of six).
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        if kind == Kind::Float {
            return x.rms_norm([self.weight.size()[0]], Some(&self.weight), self.eps);
        }
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        &self.weight * (xf * (var + self.eps).rsqrt()).to_kind(kind)
    }
}

struct Linear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    /// The layer at `p` reading the output of the module `input` (see [`super::adapt::LinearSite`]).
    fn new(
        p: &nn::Path,
        l: &mut Loader,
        input: &str,
        (n_in, n_out): (i64, i64),
        bias: bool,
    ) -> Result<Self> {
        Ok(Linear {
            adapter: l.adapter(p, input, n_in, n_out),
            weight: l.linear_weight(p, n_in, n_out, false)?,
            bias: if bias {
                Some(l.param(p, "bias", &[n_out])?)
            } else {
                None
            },
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let base = |x: &Tensor| self.weight.linear(x, self.bias.as_ref());
        match &self.adapter {
            Some(adapter) => adapter.forward(x, &base),
            None => base(x),
        }
    }
}

/// Inverse rotary frequencies `(head_dim / 2,)` in f32, with the llama3 rescaling if configured.
pub fn inv_freq(c: &LlamaConfig) -> Vec<f32> {
    let d = c.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let Some(s) = c.rope_scaling else {
        return base.iter().map(|&f| f as f32).collect();
    };
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_wavelen = old_ctx / s.low_freq_factor;
    let high_wavelen = old_ctx / s.high_freq_factor;
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * PI / f;
            let scaled = if wavelen > low_wavelen {
                f / s.factor
            } else {
                f
            };
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            let out = if medium {
                let smooth = (old_ctx / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * scaled / s.factor + smooth * scaled
            } else {
                scaled
            };
            out as f32
        })
        .collect()
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3)
}

struct Block {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    n_head: i64,
    n_kv_head: i64,
    head_dim: i64,
}

impl Block {
    fn new(p: &nn::Path, l: &mut Loader, c: &LlamaConfig) -> Result<Self> {
        let d = c.hidden_size as i64;
        let (h, kvh, hd) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim as i64,
        );
        let inter = c.intermediate_size as i64;
        let a = p / "self_attn";
        let m = p / "mlp";
        let ab = c.attention_bias;
        let block = p.components().collect::<Vec<_>>().join(".");
        let (attn_in, mlp_in) = (
            format!("{block}.input_layernorm"),
            format!("{block}.post_attention_layernorm"),
        );
        let (attn_out, act) = (format!("{block}.self_attn"), format!("{block}.mlp.act_fn"));
        Ok(Block {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), l, d, c.rms_norm_eps)?,
            q_proj: Linear::new(&(&a / "q_proj"), l, &attn_in, (d, h * hd), ab)?,
            k_proj: Linear::new(&(&a / "k_proj"), l, &attn_in, (d, kvh * hd), ab)?,
            v_proj: Linear::new(&(&a / "v_proj"), l, &attn_in, (d, kvh * hd), ab)?,
            o_proj: Linear::new(&(&a / "o_proj"), l, &attn_out, (h * hd, d), ab)?,
            post_attention_layernorm: RmsNorm::new(
                &(p / "post_attention_layernorm"),
                l,
                d,
                c.rms_norm_eps,
            )?,
            gate_proj: Linear::new(&(&m / "gate_proj"), l, &mlp_in, (d, inter), c.mlp_bias)?,
            up_proj: Linear::new(&(&m / "up_proj"), l, &mlp_in, (d, inter), c.mlp_bias)?,
            down_proj: Linear::new(&(&m / "down_proj"), l, &act, (inter, d), c.mlp_bias)?,
            n_head: h,
            n_kv_head: kvh,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        batch: &BatchMask,
        cache: Option<&mut KvCache>,
        layer: usize,
    ) -> Tensor {
        let (b_sz, seq_len, _) = {
            let s = x.size(); // (b, t, d)
            (s[0], s[1], s[2])
        };
        let h = self.input_layernorm.forward(x);
        let heads = |t: Tensor, n| t.view([b_sz, seq_len, n, self.head_dim]).transpose(1, 2); // (b, n, t, hd)
        let q = heads(self.q_proj.forward(&h), self.n_head);
        let k = heads(self.k_proj.forward(&h), self.n_kv_head);
        let v = heads(self.v_proj.forward(&h), self.n_kv_head);
        let (cos, sin) = cos_sin; // (b, 1, t, hd)
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let (k, v) = append_cache(cache, layer, k, v);
        let y = sdpa(&q, &k, &v, batch, 1.0 / (self.head_dim as f64).sqrt()); // (b, h, t, hd)
        let y = y
            .transpose(1, 2)
            .contiguous()
            .view([b_sz, seq_len, self.n_head * self.head_dim]);
        let x = x + self.o_proj.forward(&y);
        let h = self.post_attention_layernorm.forward(&x);
        let mlp = self
            .down_proj
            .forward(&(self.gate_proj.forward(&h).silu() * self.up_proj.forward(&h)));
        x + mlp
    }
}

pub struct Llama {
    vs: nn::VarStore,
    arch: ArchConfig,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// None when built without it (a task model: classification and NER never use it).
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
    kind: Kind,
    quantized: Quantized,
}

impl Llama {
    pub fn new(
        vs: nn::VarStore,
        c: LlamaConfig,
        l: &mut Loader,
        with_lm_head: bool,
    ) -> Result<Self> {
        let root = vs.root();
        let m = &root / "model";
        let (vocab, d) = (c.vocab_size as i64, c.hidden_size as i64);
        let embed_tokens = l.param(&(&m / "embed_tokens"), "weight", &[vocab, d])?;
        let blocks = (0..c.num_hidden_layers)
            .map(|i| Block::new(&(&m / "layers" / i), l, &c))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&(&m / "norm"), l, d, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            Some(embed_tokens.shallow_clone())
        } else if with_lm_head {
            Some(l.param(&(&root / "lm_head"), "weight", &[vocab, d])?)
        } else {
            l.weights.skip("lm_head.weight");
            None
        };
        let inv_freq = Tensor::from_slice(&inv_freq(&c)).to_device(vs.device());
        Ok(Llama {
            arch: ArchConfig::Llama(c),
            vs,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            inv_freq,
            kind: l.kind,
            quantized: l.quantized,
        })
    }

    /// cos/sin `(b, 1, t, head_dim)` computed in f32 and cast to the working dtype (as HF does).
    fn rotary(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]); // (b, t, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1); // (b, 1, t, hd)
        (emb.cos().to_kind(self.kind), emb.sin().to_kind(self.kind))
    }
}

impl Backbone for Llama {
    fn arch(&self) -> &ArchConfig {
        &self.arch
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        hook: &mut dyn LayerHook,
    ) -> Tensor {
        let batch = BatchMask::new(input_ids, attention_mask, cache.as_deref_mut());
        let cos_sin = self.rotary(&batch.positions);
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // (b, t, d)
        for (i, block) in self.blocks.iter().enumerate() {
            x = hook.after_block(
                i,
                block.forward(&x, &cos_sin, &batch, cache.as_deref_mut(), i),
            );
        }
        self.norm.forward(&x)
    }

    fn embed(&self, input_ids: &Tensor, _batch: &BatchMask) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    fn blocks(
        &self,
        mut x: Tensor,
        batch: &BatchMask,
        range: std::ops::Range<usize>,
        hook: &mut dyn LayerHook,
    ) -> Tensor {
        let cos_sin = self.rotary(&batch.positions);
        for i in range {
            x = hook.after_block(i, self.blocks[i].forward(&x, &cos_sin, batch, None, i));
        }
        x
    }

    fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    fn lm_head(&self) -> &Tensor {
        self.lm_head
            .as_ref()
            .expect("this backbone was built without its LM head (a task model); load it with the head to generate")
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn kind(&self) -> Kind {
        self.kind
    }

    fn quantized(&self) -> Quantized {
        self.quantized
    }
}
