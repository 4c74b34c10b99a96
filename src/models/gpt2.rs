//! GPT-2 (Radford et al. 2019), as Hugging Face `GPT2LMHeadModel` computes it: learned positions,
//! pre-LayerNorm blocks, fused `c_attn` Conv1D projections (weights stored `(in, out)`), tanh GELU.
//! Parameter paths equal the `transformers` safetensors keys (`transformer.h.0.attn.c_attn.weight`).
use super::adapt::LinearAdapter;
use super::attention::{append_cache, sdpa, BatchMask};
use super::hf_config::{ArchConfig, Gpt2Config};
use super::quant::{FrozenWeight, Quantized};
use super::weights::Loader;
use super::{Backbone, KvCache, LayerHook};
use crate::error::Result;
use tch::{nn, Kind, Tensor};

/// Hugging Face's Conv1D: `x @ W + b` with `W (in, out)` (quantized: held `(out, in)`).
struct Conv1d {
    weight: FrozenWeight,
    bias: Tensor,
    adapter: Option<Box<dyn LinearAdapter>>,
}

impl Conv1d {
    /// The layer at `p` reading the output of the module `input` (see [`super::adapt::LinearSite`]).
    fn new(p: &nn::Path, l: &mut Loader, input: &str, (n_in, n_out): (i64, i64)) -> Result<Self> {
        Ok(Conv1d {
            weight: l.linear_weight(p, n_in, n_out, true)?,
            bias: l.param(p, "bias", &[n_out])?,
            adapter: l.adapter(p, input, n_in, n_out),
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        match &self.adapter {
            Some(adapter) => adapter.forward(x, &|x| self.base(x)),
            None => self.base(x),
        }
    }
    fn base(&self, x: &Tensor) -> Tensor {
        let FrozenWeight::Dense(weight) = &self.weight else {
            return self.weight.linear(x, Some(&self.bias));
        };
        let mut out_shape = x.size();
        let n_in = out_shape.pop().unwrap_or_default();
        out_shape.push(weight.size()[1]);
        // One fused addmm over all rows, as transformers' Conv1D does.
        self.bias
            .addmm(&x.reshape([-1, n_in]), weight)
            .view(out_shape.as_slice())
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    /// BitFit's trainable shift of `bias`.
    bias_delta: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    fn new(p: &nn::Path, l: &mut Loader, d: i64, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: l.param(p, "weight", &[d])?,
            bias: l.param(p, "bias", &[d])?,
            bias_delta: l
                .adapters
                .norm_bias(&p.components().collect::<Vec<_>>().join("."), d),
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.layer_norm(
            [self.weight.size()[0]],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        );
        match &self.bias_delta {
            Some(delta) => y + delta.to_kind(x.kind()),
            None => y,
        }
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1d,
    attn_proj: Conv1d,
    ln_2: LayerNorm,
    c_fc: Conv1d,
    mlp_proj: Conv1d,
    n_head: i64,
}

impl Block {
    fn new(p: &nn::Path, l: &mut Loader, c: &Gpt2Config) -> Result<Self> {
        let (d, inner, eps) = (c.n_embd as i64, c.inner() as i64, c.layer_norm_epsilon);
        let attn = p / "attn";
        let mlp = p / "mlp";
        let block = p.components().collect::<Vec<_>>().join(".");
        let input = |module: &str| format!("{block}.{module}");
        Ok(Block {
            ln_1: LayerNorm::new(&(p / "ln_1"), l, d, eps)?,
            c_attn: Conv1d::new(&(&attn / "c_attn"), l, &input("ln_1"), (d, 3 * d))?,
            attn_proj: Conv1d::new(&(&attn / "c_proj"), l, &input("attn"), (d, d))?,
            ln_2: LayerNorm::new(&(p / "ln_2"), l, d, eps)?,
            c_fc: Conv1d::new(&(&mlp / "c_fc"), l, &input("ln_2"), (d, inner))?,
            mlp_proj: Conv1d::new(&(&mlp / "c_proj"), l, &input("mlp.act"), (inner, d))?,
            n_head: c.n_head as i64,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        batch: &BatchMask,
        cache: Option<&mut KvCache>,
        layer: usize,
    ) -> Tensor {
        let (b_sz, seq_len, d) = {
            let s = x.size(); // (b, t, d)
            (s[0], s[1], s[2])
        };
        let head_dim = d / self.n_head;
        let qkv = self.c_attn.forward(&self.ln_1.forward(x)); // (b, t, 3d)
        let heads = |t: &Tensor| {
            t.view([b_sz, seq_len, self.n_head, head_dim])
                .transpose(1, 2)
        }; // (b, h, t, hd)
        let parts = qkv.split(d, 2);
        let (q, k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
        let (k, v) = append_cache(cache, layer, k, v);
        let y = sdpa(&q, &k, &v, batch, 1.0 / (head_dim as f64).sqrt()); // (b, h, t, hd)
        let y = y.transpose(1, 2).contiguous().view([b_sz, seq_len, d]);
        let x = x + self.attn_proj.forward(&y);
        let h = self.c_fc.forward(&self.ln_2.forward(&x)).gelu("tanh");
        x + self.mlp_proj.forward(&h)
    }
}

pub struct Gpt2 {
    vs: nn::VarStore,
    arch: ArchConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// None when built without it (a task model: classification and NER never use it).
    lm_head: Option<Tensor>,
    kind: Kind,
    quantized: Quantized,
}

impl Gpt2 {
    pub fn new(
        vs: nn::VarStore,
        c: Gpt2Config,
        l: &mut Loader,
        with_lm_head: bool,
    ) -> Result<Self> {
        let root = vs.root();
        let t = &root / "transformer";
        let d = c.n_embd as i64;
        let wte = l.param(&(&t / "wte"), "weight", &[c.vocab_size as i64, d])?;
        let wpe = l.param(&(&t / "wpe"), "weight", &[c.n_positions as i64, d])?;
        let blocks = (0..c.n_layer)
            .map(|i| Block::new(&(&t / "h" / i), l, &c))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(&(&t / "ln_f"), l, d, c.layer_norm_epsilon)?;
        let lm_head = if c.tie_word_embeddings {
            Some(wte.shallow_clone())
        } else if with_lm_head {
            let shape = [c.vocab_size as i64, d];
            Some(l.param(&(&root / "lm_head"), "weight", &shape)?)
        } else {
            l.weights.skip("lm_head.weight");
            None
        };
        Ok(Gpt2 {
            arch: ArchConfig::Gpt2(c),
            vs,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            kind: l.kind,
            quantized: l.quantized,
        })
    }
}

impl Backbone for Gpt2 {
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
        let mut x = Tensor::embedding(&self.wte, input_ids, -1, false, false)
            + Tensor::embedding(&self.wpe, &batch.positions, -1, false, false); // (b, t, d)
        for (i, block) in self.blocks.iter().enumerate() {
            x = hook.after_block(i, block.forward(&x, &batch, cache.as_deref_mut(), i));
        }
        self.ln_f.forward(&x)
    }

    fn embed(&self, input_ids: &Tensor, batch: &BatchMask) -> Tensor {
        Tensor::embedding(&self.wte, input_ids, -1, false, false)
            + Tensor::embedding(&self.wpe, &batch.positions, -1, false, false)
    }

    fn blocks(
        &self,
        mut x: Tensor,
        batch: &BatchMask,
        range: std::ops::Range<usize>,
        hook: &mut dyn LayerHook,
    ) -> Tensor {
        for i in range {
            x = hook.after_block(i, self.blocks[i].forward(&x, batch, None, i));
        }
        x
    }

    fn final_norm(&self, x: &Tensor) -> Tensor {
        self.ln_f.forward(x)
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
