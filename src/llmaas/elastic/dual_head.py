"""ElastiLM's dual-head tiny LM (ELASTILM.md §6-7): all-MiniLM-L6-v2 with frozen embeddings and lower 3 layers,
shared by a score branch (upper 3 layers + per-token Linear(384→2)) and a decision branch (a second copy of the
upper 3 layers + mean pooling + Linear(384→10) for p and Linear(384→9) for m), and the 15 SLO tokens.

Owns the architecture, the SLO-token vocabulary and embedding rows, the input layout `[pre] [dec] ` + context +
query in 512-token windows (one forward each), per-word keep scores through character offsets, and saving/loading
the trained parts. Ignores where labels come from and how the
branches are trained (elastic/score_labels.py, elastic/score_train.py) and how the outputs are used at run time.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer
from torch import nn

from llmaas.elastic.slo import DECODE_SLOS, PREFILL_SLOS, PROMPT_RATIOS
from llmaas.errors import InvalidRequestError, ModelFileError
from llmaas.prompt.words import split_words, word_scores
from llmaas.tlm.embedder import mean_pool
from llmaas.tlm.encoder import BertEncoder
from llmaas.tlm.tokenizer import pad_batch

SHARED_LAYERS = 3  # embeddings + layers 1..3 frozen and shared; layers 4..6 are copied into each branch
NUM_P_CLASSES = len(PROMPT_RATIOS)  # 10
NUM_M_CLASSES = 9  # model levels 0.2..1.0
FORMAT_VERSION = "1"
MAX_TOKENS = 512  # the encoder's positions: one forward per window


def prefill_token(tenths: int) -> str:
    return f"[pre{tenths:02d}]"


def decode_token(tenths: int) -> str:
    return f"[dec{tenths:02d}]"


SLO_TOKENS = tuple(prefill_token(t) for t in PREFILL_SLOS) + tuple(decode_token(t) for t in DECODE_SLOS)  # 15


def slo_rows(embedding: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The fixed SLO-token rows [num_rows, hidden]: standard basis vectors e_0..e_{n-1}, scaled to the median norm
    of the existing token embeddings, so that they are mutually orthogonal yet on the scale the first LayerNorm
    expects (the artifact's intended one-hot rows, §7)."""
    rows = torch.zeros(num_rows, embedding.shape[1])
    rows[torch.arange(num_rows), torch.arange(num_rows)] = embedding.norm(dim=1).median()
    return rows


class DualHeadTLM(nn.Module):
    def __init__(self, encoder: BertEncoder) -> None:
        """Built from the pretrained encoder (BertEncoder.load(paths.tiny_lm_dir())); both branches start as exact
        copies of its layers 4..6, the heads at random. Only the branches and heads have gradients."""
        super().__init__()
        c = self.config = encoder.config
        if c.num_layers <= SHARED_LAYERS:
            raise InvalidRequestError(f"the encoder has {c.num_layers} layers; the dual head needs more than "
                                      f"{SHARED_LAYERS}")
        self.base_vocab_size = c.vocab_size
        word = encoder.word.weight.detach()
        self.word = nn.Embedding.from_pretrained(torch.cat([word, slo_rows(word, len(SLO_TOKENS))]), freeze=True)
        self.position, self.token_type, self.embed_norm = encoder.position, encoder.token_type, encoder.embed_norm
        self.lower = encoder.layers[:SHARED_LAYERS]
        for frozen in (self.position, self.token_type, self.embed_norm, self.lower):
            frozen.requires_grad_(False)
        upper = encoder.layers[SHARED_LAYERS:]
        self.score_layers = copy.deepcopy(upper).requires_grad_(True)
        self.score_head = nn.Linear(c.hidden_size, 2)
        self.decision_layers = copy.deepcopy(upper).requires_grad_(True)
        self.p_head = nn.Linear(c.hidden_size, NUM_P_CLASSES)
        self.m_head = nn.Linear(c.hidden_size, NUM_M_CLASSES)
        # Serving only (serve): matmuls in bf16 under autocast, set where the LLM's prefill runs bf16 (a CPU
        # with AVX-512 BF16): 1.6-1.7x faster here (Zen 4: 71 -> 45 ms at 300 tokens), and its time counts toward
        # every elastic request's TTFT. Outputs move by ~1% of their range. Training stays fp32.
        self.serve_bf16 = False

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What training changes and a file stores; everything else is the pretrained encoder."""
        return {"score_layers": self.score_layers, "score_head": self.score_head,
                "decision_layers": self.decision_layers, "p_head": self.p_head, "m_head": self.m_head}

    def shared(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [batch, tokens] -> the frozen trunk's output [batch, tokens, hidden] (layer 3): computed once
        per input and read by both branches (and precomputable for training, since it never changes)."""
        if ids.shape[1] > MAX_TOKENS:
            raise InvalidRequestError(f"{ids.shape[1]} tokens is over one {MAX_TOKENS}-token window")
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed_norm(self.word(ids) + self.token_type(torch.zeros_like(ids)) + self.position(positions))
        key_mask = mask.bool()[:, None, None, :]
        for layer in self.lower:
            h = layer(h, key_mask)
        return h

    def score(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Layer-3 states [batch, tokens, hidden] -> keep logits [batch, tokens, 2] (class 1 = keep)."""
        key_mask = mask.bool()[:, None, None, :]
        for layer in self.score_layers:
            h = layer(h, key_mask)
        return self.score_head(h)

    def decide(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-3 states -> (p logits [batch, 10], m logits [batch, 9]) from the mean over real tokens."""
        key_mask = mask.bool()[:, None, None, :]
        for layer in self.decision_layers:
            h = layer(h, key_mask)
        pooled = mean_pool(h, mask)
        return self.p_head(pooled), self.m_head(pooled)

    @torch.inference_mode()
    def serve(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A request's windows as served: (keep scores [windows, tokens] from the score branch on every window, p- and
        m-logits [10], [9] from the decision branch on the first), fp32, in bf16 matmuls when serve_bf16."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.serve_bf16):
            h = self.shared(ids, mask)
            keep = self.score(h, mask)[..., 1]  # the class-1 logit is the keep score
            p_logits, m_logits = self.decide(h[:1], mask[:1])
        return keep.float(), p_logits[0].float(), m_logits[0].float()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One window: (token keep-logits [b, t, 2], p-logits [b, 10], m-logits [b, 9])."""
        h = self.shared(ids, mask)
        return (self.score(h, mask), *self.decide(h, mask))


class DualHeadTokenizer:
    """MiniLM's WordPiece tokenizer plus the SLO tokens (ids base_vocab .. base_vocab+14), with character offsets,
    which is how encoder scores reach words (prompt/words.py) without ever indexing the LLM's tokens."""

    def __init__(self, path: Path, base_vocab_size: int) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception for a malformed file
            raise ModelFileError(f"cannot read the tokenizer {path}: {exc}") from exc
        # tokenizer.json ships with truncation and padding at 128: windows are cut here, padding is pad_batch's.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SLO_TOKENS])
        ids = [self._tokenizer.token_to_id(t) for t in SLO_TOKENS]
        if ids != list(range(base_vocab_size, base_vocab_size + len(SLO_TOKENS))):
            raise ModelFileError(f"{path}: SLO tokens got ids {ids}, not the rows after the {base_vocab_size}-token "
                                 "vocabulary")
        self.cls_id, self.sep_id = self._tokenizer.token_to_id("[CLS]"), self._tokenizer.token_to_id("[SEP]")

    def encode(self, text: str, markup: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """WordPiece ids of text, without [CLS]/[SEP], and each token's character span in text. Only markup (the SLO
        prefix) may hold special tokens: in a context or a query, "[pre02]" or "[SEP]" is text, so a request cannot
        forge its own SLO."""
        self._tokenizer.encode_special_tokens = not markup
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets


@dataclass(frozen=True)
class WindowInput:
    ids: list[int]  # [CLS] [pre] [dec] context... query... [SEP]
    context_offsets: list[tuple[int, int] | None]  # per token: its span in the context, None outside it
    num_context_chars: int  # how much of the context this window holds (it is cut from the end)


def build_window(tok: DualHeadTokenizer, prefill: int, decode: int, context: str, query: str = "") -> WindowInput:
    """The layout of §7: `[pre] [dec] ` + context + query in one window of at most 512 tokens. When it does not
    fit, the context is cut from its end (at a token boundary); the SLO tokens and the query are never cut, unless
    the query alone is over a window: then its end is cut (here only; the LLM always reads the whole query)."""
    return build_windows(tok, prefill, decode, context, query)[0]


def build_windows(tok: DualHeadTokenizer, prefill: int, decode: int, context: str,
                  query: str = "") -> list[WindowInput]:
    """Every window a context needs: the first as build_window's (the one the decision branch reads), then SLO
    tokens + the next slice of the context, without the query, for the score branch alone (§7)."""
    pre_ids, _ = tok.encode(f"{prefill_token(prefill)} {decode_token(decode)} ", markup=True)
    ctx_ids, ctx_offsets = tok.encode(context)
    q_ids, _ = tok.encode(query) if query else ([], [])
    step = MAX_TOKENS - 2 - len(pre_ids)  # 2: [CLS] and [SEP]
    q_ids = q_ids[:step]  # a query over one window is cut at its end for the tiny LM only: the LLM reads it whole
    room = step - len(q_ids)
    windows = [_window(tok, pre_ids, ctx_ids[:room], ctx_offsets[:room], q_ids)]
    for start in range(room, len(ctx_ids), step):
        windows.append(_window(tok, pre_ids, ctx_ids[start:start + step], ctx_offsets[start:start + step], []))
    return windows


def _window(tok: DualHeadTokenizer, pre_ids: list[int], ctx_ids: list[int], ctx_offsets: list[tuple[int, int]],
            q_ids: list[int]) -> WindowInput:
    offsets: list[tuple[int, int] | None] = [None] * (1 + len(pre_ids)) + list(ctx_offsets)
    offsets += [None] * (len(q_ids) + 1)
    return WindowInput([tok.cls_id, *pre_ids, *ctx_ids, *q_ids, tok.sep_id], offsets,
                       ctx_offsets[-1][1] if ctx_offsets else 0)


@dataclass(frozen=True)
class DualHeadOutput:
    word_scores: list[float]  # per word of the context (prompt.words.split_words): its tokens' mean keep-logit
    p_logits: torch.Tensor  # [10], from the first window
    m_logits: torch.Tensor  # [9]


@torch.inference_mode()
def run_dual_head(model: DualHeadTLM, tok: DualHeadTokenizer, prefill: int, decode: int, context: str,
                  query: str = "") -> DualHeadOutput:
    """Run time: all windows of a request in one batch; the score branch on every window, the decision branch on
    the first only. Scores reach words through character offsets (prompt/words.py), never through LLM positions."""
    windows = build_windows(tok, prefill, decode, context, query)
    ids, mask = pad_batch([w.ids for w in windows], model.config.pad_token_id)
    keep, p_logits, m_logits = model.serve(ids, mask)
    offsets, scores = [], []
    for i, w in enumerate(windows):
        for j, span in enumerate(w.context_offsets):
            if span is not None:
                offsets.append(span)
                scores.append(float(keep[i, j]))
    return DualHeadOutput(word_scores(split_words(context), offsets, scores), p_logits, m_logits)


def encoder_fingerprint(folder: Path) -> str:
    """The pretrained encoder a head was trained on: a hash of its weights file's size and a sample of its bytes
    (like LoadedModel.model_id), so a head is never loaded onto another encoder."""
    path = folder / "model.safetensors"
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=8)
    with open(path, "rb") as f:
        for offset in range(0, size, max(1, size // 64)):
            f.seek(offset)
            h.update(f.read(4096))
    return f"all-MiniLM-L6-v2:{h.hexdigest()}"


def default_heads_path(directory: Path) -> Path:
    """Under the LLM's elastic directory: the labels, hence the heads, depend on that LLM."""
    return directory / "tlm" / "dual_head.safetensors"


def save_heads(model: DualHeadTLM, path: Path, fingerprint: str, record: dict) -> Path:
    """The trained parts (both branches and the three heads) as safetensors, with string metadata: class, format
    version, the encoder's fingerprint and the training record as JSON. Written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, module in model.trainable_modules().items()
               for k, v in module.state_dict().items()}
    metadata = {"class": type(model).__name__, "format_version": FORMAT_VERSION, "encoder": fingerprint,
                "record": json.dumps(record)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def heads_record(path: Path) -> dict | None:
    """The training record saved with the heads, or None if there is no file."""
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["record"])


def load_heads(model: DualHeadTLM, path: Path, fingerprint: str) -> dict:
    """Load saved parts into a freshly built model; refuses a file of another class, format or encoder. Returns
    the training record."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    expected = {"class": type(model).__name__, "format_version": FORMAT_VERSION, "encoder": fingerprint}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ModelFileError(f"{path} does not fit this model: {wrong} (expected {expected}); retrain it with "
                             "`llmaas elastic score-head`")
    tensors = load_file(str(path))
    for name, module in model.trainable_modules().items():
        prefix = f"{name}."
        module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    return json.loads(meta["record"])
