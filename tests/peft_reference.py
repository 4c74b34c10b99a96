"""Class probabilities from Hugging Face peft + transformers for an adapter that `umtune export`
wrote, on given token ids (one example at a time, so no padding is involved). With `token`, the
model is a token classifier and each example gives one row of probabilities per token.

    python tests/peft_reference.py BASE_DIR ADAPTER_DIR NUM_LABELS [token] < ids.json > probs.json
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

base_dir, adapter_dir, num_labels = sys.argv[1], sys.argv[2], int(sys.argv[3])
token = len(sys.argv) > 4 and sys.argv[4] == "token"
auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
model = auto.from_pretrained(base_dir, num_labels=num_labels, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter_dir).eval()
out = []
with torch.no_grad():
    for ids in json.load(sys.stdin):
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        out.append(torch.softmax(logits.double(), -1).tolist())
json.dump(out, sys.stdout)
