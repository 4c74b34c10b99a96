"""Reference fixtures for the Rust tests, produced by Hugging Face transformers, tokenizers and
tiktoken in the project virtualenv. Rerun with `make fixtures` (writes tests/fixtures/, ignored by
git). Every number a Rust test compares against comes from here.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).parent / "fixtures"
CACHE = Path(os.environ.get("UMTUNE_CACHE", Path.home() / ".cache" / "umtune"))
GGUF = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_TOKENIZER = CACHE / "tokenizers" / "llama3" / "tokenizer.model"

# Right-padded batch: lengths 7, 4, 6 (padding id 0 is a real id; the mask is what matters).
LENGTHS = [7, 4, 6]
SEQ = max(LENGTHS)

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nmixed   \t  whitespace runs",
    "Numbers: 1234567890, 3.14159, 1e-5, 2026-11-26 and $1,000,000.",
    "Contractions: I'm, you're, he'll, we'd, they've, it's, DON'T",
    "Unicode: café naïve Zürich Ελληνικά русский 中文字符 日本語 한국어 🤗🚀 👩‍👩‍👧",
    "Code: def f(x):\n    return x**2 + 1  # comment",
    "",
    "a",
    "<|endoftext|> special <|im_start|>user\nhi<|im_end|>",
]


def batch_inputs(vocab_size):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, vocab_size, (len(LENGTHS), SEQ), generator=g)
    mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.int64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def save_reference(model, directory, extra_dtypes=()):
    """Logits and hidden states for a padded batch and for each sequence alone."""
    model.eval()
    ids, mask = batch_inputs(model.config.vocab_size)
    tensors = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        tensors["logits"] = out.logits.float()
        for i, h in enumerate(out.hidden_states):
            tensors[f"hidden.{i}"] = h.float()
        for j, n in enumerate(LENGTHS):
            alone = model(input_ids=ids[j : j + 1, :n])
            tensors[f"alone.{j}.logits"] = alone.logits.float()
        for dtype in extra_dtypes:
            m = model.to(dtype)
            tensors[f"logits.{str(dtype).split('.')[-1]}"] = m(input_ids=ids, attention_mask=mask).logits.float()
            model.to(torch.float32)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "reference.safetensors"))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # initializer_range 0.2 (not 0.02) gives O(1) activations, so a wrong op shows well above 1e-4.
    cfg = GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2)
    model = GPT2LMHeadModel(cfg)
    d = OUT / "gpt2-tiny"
    model.save_pretrained(d, safe_serialization=True)
    save_reference(model, d)


def tiny_llama(name, tied, rope_scaling, max_shard_size=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    kwargs = dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        initializer_range=0.2,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        # original_max_position_embeddings=8 puts head_dim=16 frequencies in all three bands of the
        # llama3 rule (low, smoothed, high) so that the rule is really exercised.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
    cfg = LlamaConfig(**kwargs, rope_parameters=rope)
    model = LlamaForCausalLM(cfg)
    # Random init leaves norms at 1; perturb them so a missing norm would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    d = OUT / name
    extra = {}
    if max_shard_size:
        extra["max_shard_size"] = max_shard_size
    model.save_pretrained(d, safe_serialization=True, **extra)
    save_reference(model, d, extra_dtypes=(torch.bfloat16,))


def lora_reference(name, targets, rslora=False):
    """PEFT LoRA with random (non-zero) A and B on a tiny model: its adapter files and logits."""
    from peft import LoraConfig
    peft_reference(name, "lora", LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                            init_lora_weights=False, use_rslora=rslora))


def peft_reference(name, tag, cfg):
    """A PEFT method with random (non-identity) weights on a tiny model: its adapter files and the
    logits of the padded batch."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(OUT / name), dtype=torch.float32)
    model = get_peft_model(base, cfg).eval()
    d = OUT / f"{name}-{tag}"
    model.save_pretrained(str(d))
    ids, mask = batch_inputs(base.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()}, str(d / "reference.safetensors"))


def ia3_and_prefix_references():
    from peft import IA3Config, PrefixTuningConfig
    peft_reference("gpt2-tiny", "ia3", IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                 feedforward_modules=["mlp.c_proj"], init_ia3_weights=False))
    peft_reference("llama-tiny-tied", "ia3", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"], init_ia3_weights=False))
    for name in ["gpt2-tiny", "llama-tiny-tied"]:
        peft_reference(name, "prefix", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))


def calibration_reference():
    """ECE (15 bins, Guo et al.'s binning), NLL, Brier and AURC with numpy on random logits, and the
    NLL-optimal temperature found by torch LBFGS, with the scores after scaling."""
    import numpy as np
    g = torch.Generator().manual_seed(11)
    n, c = 600, 4
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2.5
    logits[torch.arange(n), labels] += 1.5  # better than chance, over-confident
    logits[100:120] = logits[100]  # ties in confidence
    def scores(z):
        p = torch.softmax(z, -1).numpy()
        y = labels.numpy()
        conf, pred = p.max(1), p.argmax(1)
        correct = (pred == y).astype(np.float64)
        edges = np.linspace(0, 1, 16)
        ece = 0.0
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi)
            if m.any():
                ece += abs(correct[m].mean() - conf[m].mean()) * m.mean()
        nll = float(-np.log(p[np.arange(n), y]).mean())
        onehot = np.eye(c)[y]
        brier = float(((p - onehot) ** 2).sum(1).mean())
        order = np.argsort(-conf, kind="stable")
        risk = np.cumsum(1 - correct[order]) / np.arange(1, n + 1)
        return {"ece": float(ece), "nll": nll, "brier": brier, "aurc": float(risk.mean())}
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss
    opt.step(closure)
    t = float(log_t.detach().exp())
    d = OUT / "calibration"
    d.mkdir(parents=True, exist_ok=True)
    (d / "reference.json").write_text(json.dumps({
        "logits": logits.tolist(), "labels": labels.tolist(), "raw": scores(logits),
        "temperature": t, "calibrated": scores(logits / t)}))


def adamw_reference():
    """torch.optim.AdamW on a matrix (decayed) and a bias (not decayed) for three steps of given
    gradients, with the learning rate changing between steps."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 4, generator=g)
    b = torch.randn(4, generator=g)
    tensors = {"w0": w.clone(), "b0": b.clone()}
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-2)
    for step, lr in enumerate([1e-2, 5e-3, 2e-2]):
        for group in opt.param_groups:
            group["lr"] = lr
        gw, gb = torch.randn(3, 4, generator=g), torch.randn(4, generator=g)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        tensors.update({f"gw{step}": gw, f"gb{step}": gb, f"w{step + 1}": w.detach().clone(), f"b{step + 1}": b.detach().clone()})
    d = OUT / "adamw"
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "reference.safetensors"))


def seqeval_reference():
    """seqeval (default, non-strict CoNLL mode) on random tag sequences, malformed ones included
    (I- after O, type switches inside a span, E-/S- tags, stray prefixes)."""
    import random

    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(7)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "E-PER", "S-LOC", "I-ORG"]
    cases = []
    for _ in range(40):
        y_true, y_pred = [], []
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(1, 12)
            t = [rng.choice(tags) for _ in range(n)]
            # Predictions agree with the truth most of the time, so that scores are not all 0.
            p = [x if rng.random() < 0.7 else rng.choice(tags) for x in t]
            y_true.append(t)
            y_pred.append(p)
        cases.append({
            "y_true": y_true, "y_pred": y_pred,
            "entities_true": [list(e) for e in get_entities(y_true)],
            "precision": precision_score(y_true, y_pred), "recall": recall_score(y_true, y_pred),
            "f1": f1_score(y_true, y_pred),
        })
    d = OUT / "seqeval"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cases.json").write_text(json.dumps(cases))


def byte_level_bpe():
    """A small GPT-2-style BPE trained here, saved both as vocab.json+merges.txt and tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    corpus = [t for t in TEXTS if t] * 20 + [
        "the cat sat on the mat and the dog sat on the log " * 5,
        "training a byte level bpe tokenizer on a tiny corpus of english words " * 5,
    ]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus, vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>"])
    d = OUT / "bpe-tiny"
    d.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(d))
    fast = GPT2TokenizerFast.from_pretrained(str(d))
    j = OUT / "bpe-tiny-json"
    j.mkdir(parents=True, exist_ok=True)
    fast.backend_tokenizer.save(str(j / "tokenizer.json"))
    enc = {t: fast(t, add_special_tokens=False)["input_ids"] for t in TEXTS}
    assert all(enc[t] for t in TEXTS if t), "reference tokenizer produced empty encodings"
    (d / "encodings.json").write_text(json.dumps(enc, ensure_ascii=False, indent=0))


def llama3_tiktoken():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(LLAMA3_TOKENIZER))
    specials = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
        "<|python_tag|>", "<|image|>",
    ]
    specials += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(specials))]
    pat = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    enc = tiktoken.Encoding(
        name="llama3", pat_str=pat, mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(specials)},
    )
    texts = TEXTS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"]
    out = {t: enc.encode(t, allowed_special="all") for t in texts}
    d = OUT / "llama3-tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    (d / "encodings.json").write_text(json.dumps(out, ensure_ascii=False, indent=0))


def tiny_llama_gguf():
    """A tiny LLaMA written to GGUF with every tensor type umtune reads (F32, F16, BF16, Q8_0, Q4_0,
    Q4_1), q/k permuted the way llama.cpp's converter does, and the bpe-tiny vocabulary; the
    reference is transformers loading that GGUF."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    vocab = json.loads((OUT / "bpe-tiny" / "vocab.json").read_text())
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m for m in (OUT / "bpe-tiny" / "merges.txt").read_text().splitlines() if m and not m.startswith("#")]
    torch.manual_seed(2)
    cfg = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(cfg)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    d = OUT / "llama-tiny-gguf"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])

    def put(name, array, qtype):
        array = np.ascontiguousarray(array.astype(np.float32))
        if qtype == Q.F32:
            w.add_tensor(name, array)
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    put("output_norm.weight", sd["model.norm.weight"] + np.random.default_rng(0).normal(0, 0.1, 64), Q.F32)
    put("output.weight", sd["lm_head.weight"], Q.F16)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], Q.F32)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], Q.F32)
        put(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads), Q.Q4_0)
        put(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads), Q.Q4_1)
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], Q.Q8_0)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], Q.F16)
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], Q.BF16)
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], Q.Q4_0)
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], Q.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=path.name, dtype=torch.float32)
    save_reference(ref, d)


SMOLLM_SENTENCES = [
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    "Water boils at 100 degrees Celsius because",
]


def smollm2_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    model.eval()
    d = OUT / "smollm2"
    d.mkdir(parents=True, exist_ok=True)
    enc = {t: tok(t, add_special_tokens=True)["input_ids"] for t in TEXTS + SMOLLM_SENTENCES}
    (d / "encodings.json").write_text(json.dumps(enc, ensure_ascii=False, indent=0))
    tensors, generations = {}, {}
    with torch.no_grad():
        for i, s in enumerate(SMOLLM_SENTENCES):
            ids = torch.tensor([enc[s]])
            tensors[f"logits.{i}"] = model(input_ids=ids).logits[0].float().contiguous()
            gen = model.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids))
            generations[s] = {"prompt_ids": enc[s], "generated_ids": gen[0, ids.shape[1]:].tolist()}
    save_file(tensors, str(d / "reference.safetensors"))
    (d / "generations.json").write_text(json.dumps(generations, indent=0))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tiny_gpt2()
    tiny_llama("llama-tiny-tied", tied=True, rope_scaling=True)
    tiny_llama("llama-tiny-untied", tied=False, rope_scaling=False, max_shard_size="60KB")
    lora_reference("gpt2-tiny", ["c_attn"])
    lora_reference("llama-tiny-tied", ["q_proj", "v_proj", "down_proj"], rslora=True)
    ia3_and_prefix_references()
    adamw_reference()
    calibration_reference()
    seqeval_reference()
    byte_level_bpe()
    tiny_llama_gguf()
    # The tiny models get the tiny BPE so that they can be fine-tuned end to end.
    for f in ["vocab.json", "merges.txt"]:
        shutil.copy(OUT / "bpe-tiny" / f, OUT / "gpt2-tiny" / f)
    shutil.copy(OUT / "bpe-tiny-json" / "tokenizer.json", OUT / "llama-tiny-untied" / "tokenizer.json")
    if not GGUF.exists() or not LLAMA3_TOKENIZER.exists():
        sys.exit(f"missing {GGUF} or {LLAMA3_TOKENIZER}: run `make assets` first")
    llama3_tiktoken()
    smollm2_gguf()
    print(f"fixtures written to {OUT}")


if __name__ == "__main__":
    main()
