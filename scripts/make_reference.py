"""Produce the stored reference values the engine's tests compare against.

Logits and perplexity come from HF transformers loading the same GGUF (dequantised to fp32); tokenizations come from
llama.cpp (llama-cpp-python), the GGUF's own tokenizer. Run it only when the default model or the reference protocol
changes; it needs the `peers` extra (transformers, accelerate, llama-cpp-python):

    pip install -e '.[peers]' && python scripts/make_reference.py

Writes tests/data/reference_smollm2.json: token ids and logits slices of a fixed prompt, the perplexity of the
first 2048 tokens of ../shared/data/wikitext2/test.raw.txt in four 512-token windows, and llama.cpp's token ids for
a set of awkward strings (digits, whitespace runs, CRLF, accents, CJK, emoji, control-token markup). Token ids are
stored, so the logit and perplexity checks do not depend on which tokenizer produced them.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from llmaas.paths import default_model_path  # noqa: E402

OUT = ROOT / "tests" / "data" / "reference_smollm2.json"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "test.raw.txt"
PROMPT_TEXT = (
    "<|im_start|>user\nExplain in two sentences why the sky is blue, then list three colours of a rainbow."
    "<|im_end|>\n<|im_start|>assistant\nThe sky looks blue because air molecules scatter short wavelengths"
)
LOGIT_POSITIONS = (0, 5, 17, 31, -1)
TOP_K = 40
PROBE_IDS = list(range(0, 49152, 1531))  # 33 fixed ids spread over the vocabulary
PPL_WINDOW_TOKENS = 512
PPL_WINDOWS = 4
TOKENIZER_TEXTS = [
    "In 2024, 12345 people paid $3.50 each. Don't stop!  Hello\n\nworld",
    "héllo wörld — naïve café ☕ 日本語のテキスト 🤖🤖",
    "   leading spaces\tand\ttabs\r\n\r\nCRLF",
    "<|im_start|>user\nHi<|im_end|>\n",
    "x=1;y=22;z=333;w=4444",
    "I'm, you're, they'll, we'd, IT'S",
    "def f(a,b):\n    return a**b  # comment\n\n\n",
    " ",
]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = default_model_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    print(f"loaded HF reference in {time.perf_counter() - t0:.1f} s", flush=True)

    prompt_ids = tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].double()
    positions = [p if p >= 0 else len(prompt_ids) + p for p in LOGIT_POSITIONS]
    logit_rows = []
    for p in positions:
        row = logits[p]
        top = torch.topk(row, TOP_K)
        logit_rows.append({
            "position": p,
            "top_ids": top.indices.tolist(),
            "top_logits": [round(v, 5) for v in top.values.tolist()],
            "probe_logits": [round(row[i].item(), 5) for i in PROBE_IDS],
            "logsumexp": round(torch.logsumexp(row, 0).item(), 5),
        })

    text = WIKITEXT.read_text(encoding="utf-8")
    wiki_ids = tok(text[:40000], add_special_tokens=False)["input_ids"][: PPL_WINDOW_TOKENS * PPL_WINDOWS]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(PPL_WINDOWS):
            ids = torch.tensor([wiki_ids[w * PPL_WINDOW_TOKENS:(w + 1) * PPL_WINDOW_TOKENS]])
            out = model(ids).logits[0].double()
            nll += torch.nn.functional.cross_entropy(out[:-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    ppl = math.exp(nll / count)
    print(f"reference perplexity over {count} predicted tokens: {ppl:.4f}", flush=True)

    import llama_cpp

    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tokenizations = [{"text": t, "ids": vocab.tokenize(t.encode(), add_bos=False, special=True)}
                     for t in TOKENIZER_TEXTS]

    OUT.write_text(json.dumps({
        "produced_by": "scripts/make_reference.py (HF transformers, GGUF dequantised to fp32)",
        "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "prompt_ids": prompt_ids,
        "probe_ids": PROBE_IDS,
        "logits": logit_rows,
        "ppl": {"window_tokens": PPL_WINDOW_TOKENS, "token_ids": wiki_ids, "value": ppl},
        "llama_cpp_tokenizations": tokenizations,
    }) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
