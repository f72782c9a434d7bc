"""Unmerged low-rank adapters (LoRA) on the seven projections: y = W x + scale * B (A x), with W untouched.

Owns: the adapter tensors and their shapes under active widths, and the one delta function the transformer and the
training forward both call. An adapter is sized to its sub-model: q (and o's input) cover the active query heads in
group-major order (each group's kept prefix, concatenated), gate/up (and down's input) the kept FFN prefix, k/v the
full KV width. Ignores: which level or adapter is active (the elastic layer picks) and training (elastic/lora_train).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import NamedTuple

import torch

from llmaas.errors import InvalidRequestError
from llmaas.model.config import ModelConfig
from llmaas.model.linear import SMALL_BATCH_ROWS, Range, flat
from llmaas.model.widths import ModelWidths

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True, eq=False)
class LoraPair:
    a: torch.Tensor  # [rank, in_active]
    b: torch.Tensor  # [out_active, rank]
    # A^T and B^T for inference, built once: views (no copy, they follow in-place updates) without autograd history.
    # Making the transposed views on every call was a third of the adapters' decode cost (420 small ops a token).
    a_t: torch.Tensor = field(init=False, repr=False)
    b_t: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "a_t", self.a.detach().t())
        object.__setattr__(self, "b_t", self.b.detach().t())

    def delta(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """scale * (x @ A^T) @ B^T for x [..., in_active] -> [..., out_active] (differentiable; a served fp16
        adapter is computed in x's dtype)."""
        return (x @ self.a.t().to(x.dtype)) @ self.b.t().to(x.dtype) * scale


class LoraSite:
    """The adapters that read one input at one point of a layer (q/k/v, o, gate/up or down), with their output row
    ranges and the input's column ranges, and the native kernel's argument lists built once: at decode, building
    them on every call cost as much as the kernel's arithmetic (120 calls a token)."""

    def __init__(self, adapters: list[tuple[LoraPair, list[Range]]], cols: list[Range]) -> None:
        self.adapters, self.cols = adapters, cols
        self._a, self._b = [p.a for p, _ in adapters], [p.b for p, _ in adapters]
        self._rows, self._cols = [flat(rows) for _, rows in adapters], flat(cols)

    def kernel_args(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[int]], list[int]]:
        """(A's, B's, each adapter's flat output rows, the flat input columns): the native kernels' arguments."""
        return self._a, self._b, self._rows, self._cols

    def add(self, out: torch.Tensor, x: torch.Tensor, scale: float, kernels: ModuleType | None) -> None:
        """out[:, rows] += scale * (x[:, cols] @ A^T) @ B^T for each adapter, all reading the same x. out and x are
        full-width buffers indexed by absolute row and column; an adapter's inputs are the concatenation of the
        column ranges and its outputs that of its row ranges, in order (a sub-model's active heads or neurons). A
        few rows go to the native kernel in one call; more take one GEMM for all the A products and one per adapter
        (and range) for the B products."""
        if not self.adapters:
            return
        if kernels is not None and x.shape[0] <= SMALL_BATCH_ROWS:
            kernels.lora_add(out, x, *self.kernel_args(), scale)
            return
        # Adapters reading the same x share one GEMM for their A products: with rank 8 each GEMM is too thin to use
        # the cores, and at a 256-token prefill q/k/v took 2.4x as long as three separate GEMMs as fused.
        adapters = self.adapters
        # (fp32 for the GEMMs: a served adapter is stored as fp16, and the conversion is small beside the prefill)
        a_t = (adapters[0][0].a_t if len(adapters) == 1 else torch.cat([p.a_t for p, _ in adapters], dim=1)).float()
        u, k = None, 0
        for c0, c1 in self.cols:
            part = (x[:, c0:c1], a_t[k:k + c1 - c0])
            u = torch.mm(*part) if u is None else u.addmm_(*part)
            k += c1 - c0
        j = 0
        for pair, rows in adapters:
            rank, k = pair.a.shape[0], 0
            for r0, r1 in rows:
                out[:, r0:r1].addmm_(u[:, j:j + rank], pair.b_t[:, k:k + r1 - r0].float(), alpha=scale)
                k += r1 - r0
            j += rank


class LayerSites(NamedTuple):
    """A layer's four adapter sites, in the order a layer reads them: q/k/v, o, gate/up, down (a site may hold no
    adapter)."""
    qkv: LoraSite
    o: LoraSite
    gate_up: LoraSite
    down: LoraSite


@dataclass(eq=False)
class LayerLora:
    pairs: dict[str, LoraPair]  # projection name (PROJECTIONS) -> its adapter
    # Built by the transformer on first use: a site's ranges follow the widths the adapter was trained for, which
    # never change for this object (the transformer refuses an adapter under other widths).
    _sites: LayerSites | None = field(default=None, repr=False)

    def sites(self, make: Callable[[], LayerSites]) -> LayerSites:
        """This layer's sites, made once by `make`."""
        if self._sites is None:
            self._sites = make()
        return self._sites


@dataclass(frozen=True, eq=False)
class ModelLora:
    layers: tuple[LayerLora, ...]
    scale: float  # alpha / rank
    widths: ModelWidths  # the sub-model it was trained for: its shapes follow these widths, and only these

    @property
    def nbytes(self) -> int:
        return sum(p.a.nbytes + p.b.nbytes for layer in self.layers for p in layer.pairs.values())

    @property
    def num_params(self) -> int:
        return sum(p.a.numel() + p.b.numel() for layer in self.layers for p in layer.pairs.values())

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> ModelLora:
        layers = tuple(LayerLora({k: LoraPair(p.a.to(device, dtype), p.b.to(device, dtype))
                                  for k, p in layer.pairs.items()}) for layer in self.layers)
        return ModelLora(layers, self.scale, self.widths)

    def served(self) -> ModelLora:
        """A copy stored as fp16, as the service holds adapters: half the resident bytes and half the bytes a decode
        step streams (the adapters' weights were 5.8 MB a token at level 0.2); computed in fp32 everywhere (the
        native kernels widen each value, the GEMM path the whole adapter). Rounding the weights to fp16 changes a
        delta by about 1e-3 of itself."""
        return self.to(torch.device("cpu"), torch.float16)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map (for safetensors and optimizers): 'layers.<i>.<proj>.<a|b>'."""
        return {f"layers.{i}.{name}.{ab}": getattr(p, ab) for i, layer in enumerate(self.layers)
                for name, p in layer.pairs.items() for ab in ("a", "b")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], widths: ModelWidths, scale: float) -> ModelLora:
        layers = []
        for i in range(len(widths.layers)):
            pairs = {name: LoraPair(tensors[f"layers.{i}.{name}.a"], tensors[f"layers.{i}.{name}.b"])
                     for name in PROJECTIONS if f"layers.{i}.{name}.a" in tensors}
            layers.append(LayerLora(pairs))
        return cls(tuple(layers), scale, widths)

    @classmethod
    def init(cls, config: ModelConfig, widths: ModelWidths, rank: int, alpha: float,
             generator: torch.Generator) -> ModelLora:
        """Fresh adapters for a sub-model: A Kaiming-uniform (as PEFT), B zero, so the start equals no adapter."""
        if rank <= 0:
            raise InvalidRequestError(f"LoRA rank must be positive, got {rank}")
        layers = []
        for w in widths.layers:
            q_active = sum(w.q_heads) * config.head_dim
            shapes = {"q": (q_active, config.d_model), "k": (config.kv_dim, config.d_model),
                      "v": (config.kv_dim, config.d_model), "o": (config.d_model, q_active),
                      "gate": (w.ffn, config.d_model), "up": (w.ffn, config.d_model), "down": (config.d_model, w.ffn)}
            pairs = {}
            for name, (out_f, in_f) in shapes.items():
                if out_f == 0 or in_f == 0:
                    continue  # a unit set removed at this width has nothing to adapt
                bound = (1.0 / in_f) ** 0.5  # kaiming_uniform_(a=sqrt(5)) on [rank, in_f]
                a = (torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound
                pairs[name] = LoraPair(a, torch.zeros(out_f, rank))
            layers.append(LayerLora(pairs))
        return cls(tuple(layers), alpha / rank, widths)

    def check(self, config: ModelConfig) -> None:
        """Refuse adapters whose shapes do not fit their widths (a damaged or mislabelled file)."""
        self.widths.check(config)
        if len(self.layers) != config.n_layers:
            raise InvalidRequestError(f"LoRA has {len(self.layers)} layers; the model has {config.n_layers}")
        for i, (layer, w) in enumerate(zip(self.layers, self.widths.layers, strict=True)):
            q_active = sum(w.q_heads) * config.head_dim
            want = {"q": q_active, "o": q_active, "gate": w.ffn, "up": w.ffn, "down": w.ffn}
            for name, p in layer.pairs.items():
                size = p.a.shape[1] if name in ("o", "down") else p.b.shape[0]
                if name in want and size != want[name]:
                    raise InvalidRequestError(
                        f"layer {i} {name}: the adapter covers {size} units but the widths keep {want[name]}; "
                        "use the adapter trained for this level")
