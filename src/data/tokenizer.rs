//! Tokenizers from every format a backbone arrives in, all as a `tokenizers::Tokenizer`:
//! `tokenizer.json`; GPT-2 `vocab.json` + `merges.txt`; Meta's LLaMA-3 tiktoken `tokenizer.model`
//! (merges recovered from ranks as transformers' `TikTokenConverter` does); and the vocabulary
//! embedded in a GGUF file (as transformers' `gguf_tokenizer_mapping.py` builds it).
//! The byte-level tokenizers are written as tokenizer.json documents so that the result can be
//! saved next to a run and read back by any `tokenizers` implementation.
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The GPT-2 / LLaMA-3 pre-tokenization pattern of Meta's tiktoken tokenizer.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens of Meta's LLaMA-3 tokenizer, after the 128000 base tokens.
fn llama3_special_tokens() -> Vec<String> {
    let named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ];
    let mut all: Vec<String> = named.iter().map(|s| s.to_string()).collect();
    all.extend((0..256 - named.len()).map(|i| format!("<|reserved_special_token_{}|>", 2 + i)));
    all
}

/// A tokenizer plus the ids a trainer needs.
pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Whether encoding for a model should start with BOS.
    pub add_bos: bool,
}

impl TextTokenizer {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err("<memory>", e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err("<memory>", e))
    }

    /// The id to pad batches with: the pad token, else EOS, else 0 (padding is masked anyway).
    pub fn padding_id(&self) -> i64 {
        self.pad_id.or(self.eos_id).map(i64::from).unwrap_or(0)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        let mut t = Self::wrap(inner);
        // Sibling tokenizer_config.json says which special tokens the model uses.
        if let Some(cfg) = read_json_opt(&path.with_file_name("tokenizer_config.json"))? {
            let id_of = |key: &str| {
                let tok = cfg
                    .get(key)
                    .and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str()));
                tok.and_then(|s| t.inner.token_to_id(s))
            };
            t.bos_id = id_of("bos_token").or(t.bos_id);
            t.eos_id = id_of("eos_token").or(t.eos_id);
            t.pad_id = id_of("pad_token").or(t.pad_id);
            t.add_bos = cfg
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        }
        Ok(t)
    }

    /// GPT-2 `vocab.json` + `merges.txt` (as `GPT2TokenizerFast` builds them).
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let vocab_json: HashMap<String, u32> =
            serde_json::from_str(&std::fs::read_to_string(vocab).map_err(|e| Error::io(vocab, e))?)
                .map_err(|e| tok_err(vocab, e))?;
        let merges_text = std::fs::read_to_string(merges).map_err(|e| Error::io(merges, e))?;
        let mut merge_list = Vec::new();
        for (line_no, line) in merges_text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').ok_or_else(|| {
                tok_err(
                    merges,
                    format!(
                        "line {}: expected two tokens separated by a space",
                        line_no + 1
                    ),
                )
            })?;
            merge_list.push((a.to_string(), b.to_string()));
        }
        let specials: Vec<(String, u32)> = vocab_json
            .get("<|endoftext|>")
            .map(|&id| vec![("<|endoftext|>".to_string(), id)])
            .unwrap_or_default();
        let doc = byte_level_document(&vocab_json, &merge_list, &specials, None, false);
        let mut t = Self::from_document(doc, vocab)?;
        let eot = t.inner.token_to_id("<|endoftext|>");
        (t.bos_id, t.eos_id) = (eot, eot);
        Ok(t)
    }

    /// Meta's LLaMA-3 `tokenizer.model`: base64 token, space, rank per line.
    pub fn from_tiktoken(path: &Path) -> Result<Self> {
        use base64::Engine;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut ranks: HashMap<Vec<u8>, u32> = HashMap::new();
        for (line_no, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let bad = || {
                tok_err(
                    path,
                    format!("line {}: expected `BASE64 RANK`", line_no + 1),
                )
            };
            let (b64, rank) = line.split_once(' ').ok_or_else(bad)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| bad())?;
            ranks.insert(bytes, rank.trim().parse().map_err(|_| bad())?);
        }
        let (vocab, merges) = vocab_merges_from_ranks(&ranks);
        let base = ranks.len() as u32;
        let specials: Vec<(String, u32)> = llama3_special_tokens()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, base + i as u32))
            .collect();
        let doc = byte_level_document(&vocab, &merges, &specials, Some(LLAMA3_PATTERN), true);
        let mut t = Self::from_document(doc, path)?;
        t.bos_id = t.inner.token_to_id("<|begin_of_text|>");
        t.eos_id = t.inner.token_to_id("<|end_of_text|>");
        t.pad_id = t.inner.token_to_id("<|finetune_right_pad_id|>");
        t.add_bos = true;
        Ok(t)
    }

    /// A byte-level BPE described by GGUF metadata (`tokenizer.ggml.model = gpt2`).
    pub fn from_gguf_vocab(vocab: &GgufVocab, path: &Path) -> Result<Self> {
        if vocab.model != "gpt2" {
            return Err(tok_err(
                path,
                format!(
                    "tokenizer.ggml.model `{}` is not supported: only byte-level BPE (gpt2)",
                    vocab.model
                ),
            ));
        }
        let alphabet: std::collections::HashSet<char> = bytes_to_unicode().into_iter().collect();
        let spelled = |t: &str| -> String {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.to_string()
            } else {
                let map = bytes_to_unicode();
                t.bytes().map(|b| map[b as usize]).collect()
            }
        };
        let vocab_map: HashMap<String, u32> = vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (spelled(t), i as u32))
            .collect();
        let mut merge_list = Vec::with_capacity(vocab.merges.len());
        for m in &vocab.merges {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| tok_err(path, format!("tokenizer.ggml.merges: bad merge `{m}`")))?;
            merge_list.push((a.to_string(), b.to_string()));
        }
        // Control tokens (type 3) spelled in the byte alphabet become special tokens, as in
        // transformers' `add_gguf_special_tokens`.
        let specials: Vec<(String, u32)> = vocab
            .tokens
            .iter()
            .zip(&vocab.token_types)
            .enumerate()
            .filter(|(_, (t, ty))| **ty == 3 && t.chars().all(|c| alphabet.contains(&c)))
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        let pattern = match vocab.pre.as_str() {
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" => {
                Some(LLAMA3_PATTERN)
            }
            _ => None,
        };
        let doc = byte_level_document(&vocab_map, &merge_list, &specials, pattern, false);
        let mut t = Self::from_document(doc, path)?;
        t.bos_id = vocab.bos_id;
        t.eos_id = vocab.eos_id;
        t.pad_id = vocab.pad_id;
        t.add_bos = vocab.add_bos;
        Ok(t)
    }

    fn from_document(doc: Value, origin: &Path) -> Result<Self> {
        let inner: Tokenizer = serde_json::to_string(&doc)
            .map_err(|e| tok_err(origin, e))
            .and_then(|s| s.parse().map_err(|e| tok_err(origin, e)))?;
        Ok(Self::wrap(inner))
    }

    fn wrap(inner: Tokenizer) -> Self {
        TextTokenizer {
            inner,
            bos_id: None,
            eos_id: None,
            pad_id: None,
            add_bos: false,
        }
    }

    /// The tokenizer of a model directory: tokenizer.json, vocab.json+merges.txt, or a tiktoken
    /// tokenizer.model; `None` if it has none of them, an error if the one it has is broken.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_tokenizer_json(&json).map(Some);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.exists() && merges.exists() {
            return Self::from_vocab_merges(&vocab, &merges).map(Some);
        }
        let model = dir.join("tokenizer.model");
        if model.exists() {
            return Self::from_tiktoken(&model).map(Some);
        }
        Ok(None)
    }
}

/// Tokenizer fields read from GGUF metadata.
pub struct GgufVocab {
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: bool,
}

fn tok_err(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.into(),
        msg: e.to_string(),
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| tok_err(path, e))
}

/// GPT-2's reversible byte-to-printable-character map.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).unwrap_or('\0');
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap_or('\0');
            printable.push(b);
            n += 1;
        }
    }
    map
}

/// Vocabulary and merges implied by tiktoken ranks: each multi-byte token's splits into two
/// known tokens, ordered by the token's rank (transformers' `TikTokenConverter`).
fn vocab_merges_from_ranks(
    ranks: &HashMap<Vec<u8>, u32>,
) -> (HashMap<String, u32>, Vec<(String, String)>) {
    let map = bytes_to_unicode();
    let spell = |b: &[u8]| -> String { b.iter().map(|&x| map[x as usize]).collect() };
    let mut vocab = HashMap::with_capacity(ranks.len());
    let mut merges: Vec<(u32, u32, u32, String, String)> = Vec::new();
    for (token, &rank) in ranks {
        vocab.insert(spell(token), rank);
        for split in 1..token.len() {
            let (l, r) = token.split_at(split);
            if let (Some(&rl), Some(&rr)) = (ranks.get(l), ranks.get(r)) {
                merges.push((rank, rl, rr, spell(l), spell(r)));
            }
        }
    }
    merges.sort_by_key(|m| (m.0, m.1, m.2));
    (vocab, merges.into_iter().map(|m| (m.3, m.4)).collect())
}

/// A tokenizer.json document for a byte-level BPE.
fn byte_level_document(
    vocab: &HashMap<String, u32>,
    merges: &[(String, String)],
    specials: &[(String, u32)],
    split_pattern: Option<&str>,
    ignore_merges: bool,
) -> Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match split_pattern {
        None => byte_level(true),
        Some(p) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
    };
    let added: Vec<Value> = specials
        .iter()
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": byte_level(true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        }
    })
}
