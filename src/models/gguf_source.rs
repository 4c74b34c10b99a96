//! The weight source of a GGUF file: Hugging Face LLaMA parameter names mapped to llama.cpp's
//! tensor names, q/k rows un-permuted, tensors dequantized to the working dtype or, for a
//! quantized base, taken as their blocks (see `quant.rs`).
use super::gguf::GgufFile;
use super::hf_config::ArchConfig;
use super::quant::QuantWeight;
use super::WeightSource;
use crate::error::{Error, Result};
use std::collections::BTreeSet;
use tch::{Device, Kind, Tensor};

/// Serves Hugging Face LLaMA parameter names from a GGUF file.
pub struct GgufSource {
    file: GgufFile,
    n_head: i64,
    n_kv_head: i64,
    taken: BTreeSet<String>,
}

impl GgufSource {
    pub fn new(file: GgufFile) -> Result<Self> {
        let ArchConfig::Llama(c) = file.arch_config()? else {
            return Err(Error::format(
                &file.path,
                "only llama GGUF files are supported",
            ));
        };
        Ok(GgufSource {
            n_head: c.num_attention_heads as i64,
            n_kv_head: c.num_key_value_heads as i64,
            file,
            taken: BTreeSet::new(),
        })
    }

    /// The GGUF name for a Hugging Face LLaMA parameter, and the head count to un-permute with.
    fn gguf_name(&self, hf: &str) -> Option<(String, Option<i64>)> {
        let simple = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = simple.iter().find(|(h, _)| *h == hf) {
            return Some((g.to_string(), None));
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let (name, heads) = match module {
            "input_layernorm" => ("attn_norm", None),
            "post_attention_layernorm" => ("ffn_norm", None),
            "self_attn.q_proj" => ("attn_q", Some(self.n_head)),
            "self_attn.k_proj" => ("attn_k", Some(self.n_kv_head)),
            "self_attn.v_proj" => ("attn_v", None),
            "self_attn.o_proj" => ("attn_output", None),
            "mlp.gate_proj" => ("ffn_gate", None),
            "mlp.up_proj" => ("ffn_up", None),
            "mlp.down_proj" => ("ffn_down", None),
            _ => return None,
        };
        Some((format!("blk.{layer}.{name}.{suffix}"), heads))
    }
}

/// Undoes llama.cpp's interleaving of the rotary halves of q/k rows (transformers'
/// `_reverse_permute_weights`) on a tensor whose rows are the weight's rows, for `heads` heads.
fn unpermute(t: &Tensor, heads: Option<i64>) -> Tensor {
    let Some(n) = heads else {
        return t.shallow_clone();
    };
    let shape = t.size();
    let mut split = vec![n, shape[0] / n / 2, 2];
    split.extend(&shape[1..]);
    t.reshape(&split).transpose(1, 2).reshape(&shape)
}

impl GgufSource {
    /// The GGUF name of `name` and its heads to un-permute, checked to exist with `shape`.
    fn located(&self, name: &str, shape: &[i64]) -> Result<(String, Option<i64>)> {
        let (gname, heads) = self
            .gguf_name(name)
            .ok_or_else(|| Error::tensor(&self.file.path, name, "has no GGUF counterpart"))?;
        let info = self.file.tensors.get(&gname).ok_or_else(|| {
            Error::tensor(
                &self.file.path,
                &gname,
                format!("missing (needed for `{name}`)"),
            )
        })?;
        if info.shape != shape {
            return Err(Error::tensor(
                &self.file.path,
                &gname,
                format!(
                    "has shape {:?}, the model expects {:?} for `{name}`",
                    info.shape, shape
                ),
            ));
        }
        Ok((gname, heads))
    }
}

impl WeightSource for GgufSource {
    fn take(&mut self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let (gname, heads) = self.located(name, shape)?;
        let t = unpermute(&self.file.dequantize(&gname)?, heads);
        self.taken.insert(gname);
        Ok(t.to_kind(kind).to_device(device))
    }

    fn take_quantized(
        &mut self,
        name: &str,
        shape: &[i64],
        bits: i64,
        device: Device,
    ) -> Result<Option<QuantWeight>> {
        let (gname, heads) = self.located(name, shape)?;
        let Some(q) = self.file.blocks(&gname, bits)? else {
            return Ok(None);
        };
        self.taken.insert(gname);
        Ok(Some(q.map_rows(|t| unpermute(t, heads)).to_device(device)))
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name)
            .is_some_and(|(g, _)| self.file.tensors.contains_key(&g))
    }

    fn skip(&mut self, name: &str) {
        if let Some((g, _)) = self.gguf_name(name) {
            self.taken.insert(g);
        }
    }

    fn finish(&mut self) -> Result<()> {
        match self.file.tensors.keys().find(|k| !self.taken.contains(*k)) {
            Some(k) => Err(Error::tensor(
                &self.file.path,
                k,
                "is unexpected: the model has no such parameter",
            )),
            None => Ok(()),
        }
    }
}
