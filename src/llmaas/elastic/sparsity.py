"""DejaVu-style contextual FFN sparsity (ELASTILM.md §10.2, the model side of the Lingua2+Contextual baseline): a
small per-layer predictor reads the FFN's input and, per token, only the neurons it ranks highest run.

Owns the predictor (per layer MLP(d -> 128 -> d_ffn), ReLU, then a sigmoid), its training data (500 windows of
128 LLM tokens of the score head's training text: train splits and general text, never an evaluation item), its
training (BCE, 10 epochs, AdamW, LR 1e-4, weight decay 1e-5, as §10.2 says; 10% of windows held out for its
recall), its file (`sparsity.pt` under the elastic directory) and the model that applies it. The label is *active*,
SiLU(gate) >= 0.001 (the artifact's label marks the inactive ones while its mask keeps the highest predictions, so
it keeps neurons predicted inactive; §10.2's decision fixes it). At run time each token keeps the top
ceil(keep * d_ffn) neurons by predicted probability and the rest are zeroed (their `up` output, so
SiLU(gate) * up is 0): this reproduces the accuracy of the sparse FFN, not its speed, which needs sparse kernels
this engine does not have for a per-token neuron set. Runs on the original (unreordered) weights. Ignores the
prompt side (prompt/compress.py) and scoring (bench/elastic_serving.py).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmaas.elastic.dense_forward import DenseWeights, hidden_states
from llmaas.elastic.score_labels import training_texts
from llmaas.model.linear import Linear, Range
from llmaas.model.loader import LoadedModel
from llmaas.model.transformer import Transformer
from llmaas.paths import SHARED_DATA_DIR

SPARSITY_FILE = "sparsity.pt"
ACTIVE = 1e-3  # a neuron is active for a token when SiLU(gate) >= this


@dataclass(frozen=True)
class SparsityConfig:
    windows: int = 500
    window_tokens: int = 128
    hidden: int = 128
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_tokens: int = 256
    held_out_fraction: float = 0.1
    seed: int = 0


class SparsityPredictor(nn.Module):
    def __init__(self, n_layers: int, d_model: int, ffn_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, ffn_dim))
                                    for _ in range(n_layers))

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Per token of x [M, d], a logit per neuron (the sigmoid is monotone, so ranks need no more)."""
        return self.layers[layer](x)


def sample_windows(loaded: LoadedModel, config: SparsityConfig, data_dir: Path = SHARED_DATA_DIR) -> torch.Tensor:
    """[windows, window_tokens] LLM token ids: consecutive tokens of the training texts, sources taken round-robin
    in a seeded order (so every kind of text is in a small sample)."""
    rng = random.Random(config.seed)
    pools = []
    for texts in training_texts(data_dir).values():
        texts = texts[:]
        rng.shuffle(texts)
        pools.append(iter(texts))
    out: list[list[int]] = []
    while pools and len(out) < config.windows:
        for it in list(pools):
            text = next(it, None)
            if text is None:
                pools.remove(it)
                continue
            ids = loaded.tokenizer.encode(text)
            if len(ids) >= config.window_tokens:
                out.append(ids[:config.window_tokens])
            if len(out) == config.windows:
                break
    if len(out) < config.windows:
        raise ValueError(f"only {len(out)} texts of >= {config.window_tokens} tokens in {data_dir}")
    return torch.tensor(out)


@torch.no_grad()
def ffn_inputs(loaded: LoadedModel, dense: DenseWeights, windows: torch.Tensor, batch: int = 8,
               log: Callable[[str], object] = print) -> list[torch.Tensor]:
    """Per layer, the FFN's normed input of every token [windows * tokens, d] in fp16 (the original weights)."""
    c = loaded.config
    out: list[list[torch.Tensor]] = [[] for _ in range(c.n_layers)]

    def tap(i: int, h_in: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, h_out: torch.Tensor) -> None:
        x2 = F.rms_norm(h_in + attn, (c.d_model,), dense.layers[i].ffn_norm, c.norm_eps)
        out[i].append(x2.reshape(-1, c.d_model).half())

    started = time.perf_counter()
    for b in range(0, len(windows), batch):
        hidden_states(loaded.model, dense, windows[b:b + batch], tap=tap)
        done = min(b + batch, len(windows))
        if done % (batch * 10) == 0 or done == len(windows):
            el = time.perf_counter() - started
            log(f"  sparsity data: {done}/{len(windows)} windows ({el:.0f} s, "
                f"ETA {el / done * (len(windows) - done):.0f} s)")
    return [torch.cat(parts) for parts in out]


def train_predictor(dense: DenseWeights, inputs: list[torch.Tensor], config: SparsityConfig, held_out: int,
                    log: Callable[[str], object] = print) -> tuple[SparsityPredictor, dict]:
    """Each layer's predictor on its tokens (the last `held_out` rows kept out); returns it and, per layer, the
    held-out recall of the truly active neurons when keeping as many as are active on average."""
    n_layers, d = len(inputs), inputs[0].shape[1]
    ffn = dense.layers[0].wg.shape[0]
    torch.manual_seed(config.seed)
    model = SparsityPredictor(n_layers, d, ffn, config.hidden)
    gen = torch.Generator().manual_seed(config.seed)
    recall, active_frac, started = [], [], time.perf_counter()
    for i, x_all in enumerate(inputs):
        wg = dense.layers[i].wg
        x_train, x_test = x_all[:-held_out].float(), x_all[-held_out:].float()
        head = model.layers[i]
        opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        for _ in range(config.epochs):
            order = torch.randperm(len(x_train), generator=gen)
            for b in range(0, len(order), config.batch_tokens):
                x = x_train[order[b:b + config.batch_tokens]]
                with torch.no_grad():
                    target = (F.silu(x @ wg.t()) >= ACTIVE).float()
                loss = F.binary_cross_entropy_with_logits(head(x), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            truth = F.silu(x_test @ wg.t()) >= ACTIVE
            k = max(1, round(float(truth.float().mean()) * ffn))
            picked = torch.zeros_like(truth).scatter_(1, head(x_test).topk(k, dim=1).indices, True)
            recall.append(float((picked & truth).sum() / truth.sum().clamp(min=1)))
            active_frac.append(float(truth.float().mean()))
        el = time.perf_counter() - started
        log(f"  sparsity predictor: layer {i + 1}/{n_layers} held-out recall {recall[-1]:.3f} "
            f"(active {active_frac[-1]:.2f}; {el:.0f} s, ETA {el / (i + 1) * (n_layers - i - 1):.0f} s)")
    return model.eval(), {"held_out_recall": recall, "active_fraction": active_frac}


def build_predictor(loaded: LoadedModel, directory: Path, config: SparsityConfig = SparsityConfig(),
                    log: Callable[[str], object] = print, data_dir: Path = SHARED_DATA_DIR) -> dict:
    """Sample, collect, train and save (`sparsity.pt`); a few minutes here."""
    started = time.perf_counter()
    windows = sample_windows(loaded, config, data_dir)
    dense = DenseWeights.expanded(loaded.config, loaded.model.weights)
    inputs = ffn_inputs(loaded, dense, windows, log=log)
    held_out = max(1, round(len(windows) * config.held_out_fraction)) * config.window_tokens
    model, quality = train_predictor(dense, inputs, config, held_out, log)
    record = {"model": loaded.model_id, "config": vars(config), "windows": len(windows), **quality,
              "wall_s": time.perf_counter() - started}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"record": record, "state": model.state_dict()}, directory / SPARSITY_FILE)
    return record


def load_predictor(directory: Path, loaded: LoadedModel) -> SparsityPredictor | None:
    """The trained predictor, or None when absent or trained on another model."""
    path = directory / SPARSITY_FILE
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True)
    record = saved["record"]
    if record["model"] != loaded.model_id:
        return None
    c = loaded.config
    model = SparsityPredictor(c.n_layers, c.d_model, c.ffn_dim, record["config"]["hidden"])
    model.load_state_dict(saved["state"])
    return model.eval()


class SparseGateUp:
    """A layer's gate+up projection that then zeroes, per token, the `up` rows of the neurons its predictor does not
    rank in the top `kept`. Quacks like the Linear it wraps for the one call the transformer makes at full width."""

    def __init__(self, linear: Linear, head: nn.Module, kept: int) -> None:
        self.linear, self.head, self.kept = linear, head, kept
        self.ffn = linear.out_features // 2

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes + sum(p.nbytes for p in self.head.parameters())

    @torch.no_grad()
    def apply(self, x: torch.Tensor, out: torch.Tensor, rows: Range | None = None, cols: Range | None = None,
              accumulate: bool = False) -> torch.Tensor:
        if rows is not None or cols is not None or accumulate:
            raise ValueError("contextual sparsity runs at full width only")
        self.linear.apply(x, out)
        drop = self.head(x).topk(self.ffn - self.kept, dim=1, largest=False).indices
        out[:, self.ffn:].scatter_(1, drop, 0.0)
        return out


def sparse_model(loaded: LoadedModel, predictor: SparsityPredictor, keep: float) -> Transformer:
    """`loaded`'s model (original weights, shared) with every layer's FFN keeping ceil(keep * d_ffn) neurons per
    token; keep = 1 is the model itself."""
    if keep >= 1:
        return loaded.model
    w = loaded.model.weights
    kept = math.ceil(keep * loaded.config.ffn_dim)
    layers = tuple(replace(lw, gate_up=SparseGateUp(lw.gate_up, predictor.layers[i], kept))
                   for i, lw in enumerate(w.layers))
    return Transformer(loaded.config, replace(w, layers=layers), loaded.model.kernels)
