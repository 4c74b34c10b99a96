"""Probabilities from transformers alone (no peft) for a model directory that `umtune export
--format merged` wrote, on given token ids (one example at a time, no padding), and what its
tokenizer makes of given texts. With `token`, the model is a token classifier.

    python tests/merged_reference.py MODEL_DIR [token] < {"ids": [[...]], "texts": [...]}
"""
import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

model_dir = sys.argv[1]
token = len(sys.argv) > 2 and sys.argv[2] == "token"
auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
request = json.load(sys.stdin)
probs = []
with torch.no_grad():
    for ids in request["ids"]:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        probs.append(torch.softmax(logits.double(), -1).tolist())
tokenizer = AutoTokenizer.from_pretrained(model_dir)
json.dump(
    {
        "probabilities": probs,
        "tokenized": [tokenizer(t)["input_ids"] for t in request["texts"]],
        "id2label": model.config.id2label,
        "class": type(model).__name__,
    },
    sys.stdout,
)
