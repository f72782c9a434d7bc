"""The llama-family transformer: a pure function of (token ids, positions, KV view) -> logits.

Owns the forward math and nothing else: it never allocates or keeps KV (the caller's KVView does), takes positions
explicitly (so non-contiguous chunks are recomputed at their true positions), runs any layer range on given hidden
states (so a restore can sync with IO per layer), fills AttentionStats when asked (chunk density), and runs elastic
sub-models as active widths (prefixes of query heads per KV group and of FFN neurons; zero-copy weight views) with
optional unmerged LoRA deltas (model/lora.py) on the seven projections.
Two execution paths share one layer structure: up to SMALL_BATCH_ROWS rows (decode) use the native block kernels;
larger batches (prefill, recompute) use fp32 GEMM and PyTorch attention. On a dense cache's slots the decode path runs
every layer in one native call (kernels.cpp: decode_layers) over per-layer plans built once per width and adapter;
it computes the same bits as calling the kernels one at a time (`_layer`), which other views still do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from llmaas.errors import InvalidRequestError
from llmaas.model.config import ModelConfig
from llmaas.model.kv_view import KVView
from llmaas.model.linear import SMALL_BATCH_ROWS, Linear, flat, joined
from llmaas.model.lora import LayerLora, LayerSites, LoraSite, ModelLora
from llmaas.model.rope import RopeTable
from llmaas.model.stats import AttentionStats
from llmaas.model.weights import BLOCK, Q4Blocks
from llmaas.model.widths import LayerWidths, ModelWidths

# Prompt tokens per prefill step, for every caller that prefills (generator, store, recompute). Bounds the
# activations a step holds: 256 rather than 512 lowered the peak resident set of a 2,048-token prefill by 16-19 MB
# (of the ~60 MB over the idle engine, the rest being its KV) at no measurable cost in speed (bf16 path, Zen 4,
# interleaved A/B: 0.99-1.00x; docs/ENGINE.md).
DEFAULT_PREFILL_CHUNK_TOKENS = 256

# Width/adapter pairs whose native decode plans are kept (the elastic model's nine levels, with and without adapters).
_STEP_PLANS_KEPT = 20

# Query rows per chunk of the explicit (statistics-producing) attention: bounds the [heads, rows, keys] scores.
_STATS_ROW_CHUNK = 256


@dataclass(frozen=True, eq=False)
class LayerWeights:
    attn_norm: torch.Tensor  # [d_model]
    qkv: Linear  # rows: q (n_heads * head_dim, grouped by KV head), k (kv_dim), v (kv_dim)
    o: Linear  # [d_model, n_heads * head_dim]
    ffn_norm: torch.Tensor  # [d_model]
    gate_up: Linear  # rows: gate (ffn_dim), up (ffn_dim)
    down: Linear  # [d_model, ffn_dim]


@dataclass(frozen=True, eq=False)
class ModelWeights:
    embedding: Linear  # [vocab, d_model], looked up by row; the same object as lm_head when the model ties them
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor  # [d_model]
    lm_head: Linear  # [vocab, d_model]
    rope_freq_factors: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        linears = [self.lm_head] + [lin for lw in self.layers for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        total = sum(lin.nbytes for lin in linears) + self.final_norm.nbytes
        total += sum(lw.attn_norm.nbytes + lw.ffn_norm.nbytes for lw in self.layers)
        if self.embedding is not self.lm_head:
            total += self.embedding.nbytes
        return total


class _Pass:
    """What one forward pass shares across its layers: positions, masking inputs, scratch buffers and the views
    into them (built once per pass, not per layer: on the decode path these views cost as much as the math)."""

    def __init__(self, c: ModelConfig, positions: torch.Tensor, key_positions: torch.Tensor, kv: KVView,
                 widths: ModelWidths | None, lora: ModelLora | None, stats: AttentionStats | None, small: bool,
                 mask: torch.Tensor | None, causal: bool) -> None:
        m = positions.shape[0]
        self.positions, self.key_positions, self.kv = positions, key_positions, kv
        self.widths, self.lora, self.stats = widths, lora, stats
        self.small = small  # use the native kernels (few rows)
        self.mask = mask  # [M, T] bool for the PyTorch path; None when every key is visible to every row
        self.causal = causal  # keys are exactly the queries, in order: the fused kernel may use is_causal, not mask
        self._additive_mask: torch.Tensor | None = None
        self.x = torch.empty(m, c.d_model)  # normed input of a sub-block (kernel path; PyTorch's norm makes its own)
        self.qkv = torch.empty(m, c.q_dim + 2 * c.kv_dim)
        self.q = self.qkv[:, :c.q_dim].view(m, c.n_heads, c.head_dim)
        self.k = self.qkv[:, c.q_dim:c.q_dim + c.kv_dim].view(m, c.n_kv_heads, c.head_dim)
        self.new_kv = self.qkv[:, c.q_dim:].view(m, 2, c.n_kv_heads, c.head_dim).permute(1, 2, 0, 3)
        self.attn = torch.empty(m, c.n_heads, c.head_dim)
        self.attn_flat = self.attn.view(m, c.q_dim)
        self.gate_up = torch.empty(m, 2 * c.ffn_dim)
        self.gate, self.up = self.gate_up[:, :c.ffn_dim], self.gate_up[:, c.ffn_dim:]
        self.full_heads = [c.heads_per_group] * c.n_kv_heads
        self.full_head_ranges = _head_ranges(c, self.full_heads)


    def fused_mask(self) -> torch.Tensor | None:
        """The mask as the fused attention wants it: fp32, 0 where a row may attend and -inf elsewhere, built once
        per pass. Given the bool mask, PyTorch builds this itself in every call: twice per layer at 4 MB each for a
        512-token chunk over 2,048 keys, 5% of the chunk's time (profiled)."""
        if self.causal or self.mask is None:
            return None
        if self._additive_mask is None:
            self._additive_mask = torch.zeros(self.mask.shape).masked_fill_(~self.mask, float("-inf"))
        return self._additive_mask


def _head_ranges(c: ModelConfig, q_heads: Sequence[int]) -> list[tuple[int, int]]:
    """Rows of Wq (columns of Wo and of the attention output) of the active query heads: each KV group's kept
    prefix, in group order."""
    group = c.heads_per_group * c.head_dim
    return [(g * group, g * group + kept * c.head_dim) for g, kept in enumerate(q_heads) if kept]


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, kernels: ModuleType | None) -> None:
        self.config = config
        self.weights = weights
        self.kernels = kernels
        self.rope = RopeTable(config.head_dim, config.rope_theta, config.context_length, config.rope_linear_factor,
                              weights.rope_freq_factors)
        self._scale = config.head_dim ** -0.5
        # Decode (few rows, a dense cache's slots) runs every layer in one native call (kernels.cpp: decode_layers)
        # unless this is False: the per-kernel path computes the same bits, a kernel call at a time.
        self.native_step = kernels is not None
        self._steps: dict[tuple[int, int], tuple[ModelWidths | None, ModelLora | None, list | None]] = {}

    # -- the pure function and its pieces -------------------------------------------------------------------------

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv: KVView, *,
                widths: ModelWidths | None = None, lora: ModelLora | None = None,
                stats: AttentionStats | None = None) -> torch.Tensor:
        """Logits [M, vocab] for tokens [M] at positions [M], reading and extending the caller's KV view."""
        h = self.embed(token_ids)
        h = self.run_layers(h, positions, kv, widths=widths, lora=lora, stats=stats)
        return self.logits(h)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [M, d_model] (a new tensor, safe to update in place) for token ids [M]."""
        if token_ids.dim() != 1:
            raise InvalidRequestError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.vocab_size):
            raise InvalidRequestError(f"token ids must lie in 0..{self.config.vocab_size - 1}")
        return self.weights.embedding.lookup(token_ids)

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, kv: KVView, start: int = 0,
                   stop: int | None = None, *, widths: ModelWidths | None = None, lora: ModelLora | None = None,
                   stats: AttentionStats | None = None) -> torch.Tensor:
        """Run layers [start, stop) on hidden states h [M, d_model] (updated in place and returned)."""
        stop = self.config.n_layers if stop is None else stop
        if not 0 <= start <= stop <= self.config.n_layers:
            raise InvalidRequestError(f"layer range [{start}, {stop}) outside 0..{self.config.n_layers}")
        if positions.shape != (h.shape[0],):
            raise InvalidRequestError(f"need one position per token: {tuple(positions.shape)} vs {h.shape[0]} rows")
        if widths is not None:
            widths.check(self.config)
        if lora is not None and lora.widths != (widths or ModelWidths.full(self.config)):
            # identity makes this free for the views the elastic model built once
            raise InvalidRequestError("the LoRA adapter was trained for other widths; use the adapter of this level")
        p = self._begin(h.shape[0], positions.to(torch.int64).contiguous(), kv, widths, lora, stats)
        stores = kv.slot_stores() if p.small and self.native_step and hasattr(kv, "slot_stores") else None
        steps = self._decode_steps(widths, lora) if stores is not None and h.is_contiguous() else None
        if steps is not None:
            assert stores is not None
            stats_args = (p.stats.prob_sum, p.stats.row_count) if p.stats is not None else (None, None)
            self.kernels.decode_layers(steps[start:stop], h, p.positions, p.key_positions, stores[0][start:stop],
                                       stores[1], self.rope.cos, self.rope.sin, self._scale, self.config.norm_eps,
                                       *stats_args)
            return h
        for layer in range(start, stop):
            self._layer(layer, h, p)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [M, d_model] -> [M, vocab] fp32."""
        x = self._norm(h, self.weights.final_norm, torch.empty_like(h), self._uses_kernels(h.shape[0]))
        out = torch.empty(h.shape[0], self.config.vocab_size)
        return self.weights.lm_head.apply(x, out)

    # -- internals -------------------------------------------------------------------------------------------------

    @property
    def native_decode(self) -> bool:
        """Whether a decode step on a dense cache runs as one native call (`llmaas info` says which path runs)."""
        return self.native_step and self._decode_steps(None, None) is not None

    def weights_changed(self) -> None:
        """Forget the native decode plans: they hold the weight blocks they were built on, and a reordering that
        replaces blocks (elastic/reorder.py) must not leave a plan reading the old ones."""
        self._steps.clear()

    def _decode_steps(self, widths: ModelWidths | None, lora: ModelLora | None) -> list | None:
        """The native decode step's per-layer plans for these widths and adapter (built once, kept for the last few
        pairs; identity keys, held so they stay valid), or None where a matrix is not block-stored or a sub-model's
        head ranges do not start on weight blocks (the per-kernel path then runs)."""
        key = (id(widths), id(lora))
        found = self._steps.get(key)
        if found is None:
            found = self._steps[key] = (widths, lora, self._build_steps(widths, lora))
            if len(self._steps) > _STEP_PLANS_KEPT:
                del self._steps[next(iter(self._steps))]
        return found[2]

    def _build_steps(self, widths: ModelWidths | None, lora: ModelLora | None) -> list | None:
        c = self.config
        dims = [c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim]
        full = [c.heads_per_group] * c.n_kv_heads
        steps = []
        for i, lw in enumerate(self.weights.layers):
            mats = []
            for lin in (lw.qkv, lw.o, lw.gate_up, lw.down):
                b = lin.blocks
                if b is None:
                    return None
                mats.append((b.qs, b.scales, b.mins if isinstance(b, Q4Blocks) else None))
            width = widths.layers[i] if widths is not None else None
            active = list(width.q_heads) if width is not None else full
            heads = _head_ranges(c, active)
            sliced = active != full
            qkv_rows = joined([*heads, (c.q_dim, c.q_dim + 2 * c.kv_dim)]) if sliced else []
            o_cols = joined(heads) if sliced else []
            if any(a % BLOCK for a, _ in o_cols):
                return None
            kept = width.ffn if width is not None else c.ffn_dim
            sites = self._lora_sites(lora.layers[i], heads, kept) if lora is not None else ()
            steps.append(self.kernels.make_layer_step(
                dims, lw.attn_norm, lw.ffn_norm, mats, sliced, flat(qkv_rows), flat(o_cols), active, kept,
                [site.kernel_args() for site in sites], lora.scale if lora is not None else 0.0))
        return steps

    def _uses_kernels(self, rows: int) -> bool:
        return self.kernels is not None and rows <= SMALL_BATCH_ROWS

    def _begin(self, m: int, positions: torch.Tensor, kv: KVView, widths: ModelWidths | None,
               lora: ModelLora | None, stats: AttentionStats | None) -> _Pass:
        self.rope.check(positions)
        key_positions = kv.key_positions().to(torch.int64).contiguous()
        if stats is not None and stats.prob_sum.shape != key_positions.shape:
            raise InvalidRequestError(
                f"stats cover {stats.prob_sum.numel()} keys but the view has {key_positions.numel()}"
            )
        explicit = getattr(kv, "attention_mask", None)
        small = self._uses_kernels(m) and explicit is None  # the kernels mask by position only
        mask, causal = None, False
        if explicit is not None:
            mask = explicit()  # [M, T] bool: True where a row may attend
            if mask.shape != (m, key_positions.numel()):
                raise InvalidRequestError(f"attention mask {tuple(mask.shape)} must be [{m}, {key_positions.numel()}]")
        elif not small and m and int(key_positions.max()) > int(positions.min()):
            mask = key_positions[None, :] <= positions[:, None]
            # a fresh prompt (keys == queries, in order) lets the fused kernel skip the masked half outright
            causal = torch.equal(key_positions, positions) and bool((positions.diff() > 0).all())
        return _Pass(self.config, positions, key_positions, kv, widths, lora, stats, small, mask, causal)

    def _layer(self, layer: int, h: torch.Tensor, p: _Pass) -> None:
        lw = self.weights.layers[layer]
        width = p.widths.layers[layer] if p.widths is not None else None
        lora = p.lora.layers[layer] if p.lora is not None else None
        active = list(width.q_heads) if width is not None else p.full_heads
        heads = _head_ranges(self.config, active) if width is not None else p.full_head_ranges
        kept = width.ffn if width is not None else self.config.ffn_dim
        sites = self._lora_sites(lora, heads, kept) if lora is not None else None
        x = self._norm(h, lw.attn_norm, p.x, p.small)
        self._project_qkv(lw.qkv, x, p, width, heads)
        if sites is not None:  # q over the active heads (adapter rows in group-major prefix order), k and v; pre-RoPE
            sites.qkv.add(p.qkv, x, p.lora.scale, self.kernels)
        self._rope(p.q, p)
        self._rope(p.k, p)
        kv = p.kv.update(layer, p.new_kv)
        self._attend(kv, active, p, width is not None)
        self._project_out(lw.o, p, width, heads, h)
        if sites is not None:  # over the active heads' outputs (adapter columns in their order)
            sites.o.add(h, p.attn_flat, p.lora.scale, self.kernels)
        x = self._norm(h, lw.ffn_norm, p.x, p.small)
        self._ffn(lw, x, p, kept, h, sites)

    def _lora_sites(self, lora: LayerLora, heads: list[tuple[int, int]], kept: int) -> LayerSites:
        """The layer's adapter sites (made once per adapter): which adapters read which input, and where they add."""
        return lora.sites(lambda: self._make_sites(lora, heads, kept))

    def _make_sites(self, lora: LayerLora, heads: list[tuple[int, int]], kept: int) -> LayerSites:
        c, f, d = self.config, self.config.ffn_dim, [(0, self.config.d_model)]

        def site(outputs: dict[str, list[tuple[int, int]]], cols: list[tuple[int, int]]) -> LoraSite:
            return LoraSite([(lora.pairs[n], rows) for n, rows in outputs.items() if n in lora.pairs], cols)

        k, v = (c.q_dim, c.q_dim + c.kv_dim), (c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim)
        return LayerSites(site({"q": heads, "k": [k], "v": [v]}, d), site({"o": d}, heads),
                          site({"gate": [(0, kept)], "up": [(f, f + kept)]}, d), site({"down": d}, [(0, kept)]))

    def _norm(self, h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, small: bool) -> torch.Tensor:
        """RMSNorm of h: written into `out` by the kernel; PyTorch's returns a fresh tensor (no copy into out)."""
        if small:
            self.kernels.rms_norm(out, h, w, self.config.norm_eps)
            return out
        return F.rms_norm(h, (h.shape[1],), w, self.config.norm_eps)

    def _rope(self, x: torch.Tensor, p: _Pass) -> None:
        if p.small:
            self.kernels.rope_(x, p.positions, self.rope.cos, self.rope.sin)
        else:
            self.rope.apply_(x, p.positions)

    def _project_qkv(self, qkv: Linear, x: torch.Tensor, p: _Pass, width: LayerWidths | None,
                     heads: list[tuple[int, int]]) -> None:
        c = self.config
        if width is None or width.q_heads == tuple(p.full_heads):  # one call when every head is active
            qkv.apply(x, p.qkv)
            return
        qkv.apply_ranges(x, p.qkv, [*heads, (c.q_dim, c.q_dim + 2 * c.kv_dim)], [(0, c.d_model)])

    def _project_out(self, o: Linear, p: _Pass, width: LayerWidths | None, heads: list[tuple[int, int]],
                     h: torch.Tensor) -> None:
        """h += attention output @ Wo^T over the active heads (each group's active heads are contiguous)."""
        if width is None or width.q_heads == tuple(p.full_heads):
            o.apply(p.attn_flat, h, accumulate=True)
            return
        if heads:
            o.apply_ranges(p.attn_flat, h, [(0, self.config.d_model)], heads, accumulate=True)

    def _ffn(self, lw: LayerWeights, x: torch.Tensor, p: _Pass, kept: int, h: torch.Tensor,
             sites: LayerSites | None) -> None:
        """h += down(silu(gate(x)) * up(x)) over the first `kept` neurons; the activation overwrites gate."""
        if kept == 0:
            return
        f = self.config.ffn_dim
        if kept == f:
            lw.gate_up.apply(x, p.gate_up)
            gate, up = p.gate, p.up
        else:
            gate, up = p.gate[:, :kept], p.up[:, :kept]
            lw.gate_up.apply_ranges(x, p.gate_up, [(0, kept), (f, f + kept)], [(0, self.config.d_model)])
        if sites is not None:
            sites.gate_up.add(p.gate_up, x, p.lora.scale, self.kernels)
        if p.small:
            self.kernels.silu_mul(gate, gate, up)
        else:
            F.silu(gate, inplace=True).mul_(up)
        lw.down.apply(gate, h, cols=(0, kept), accumulate=True)
        if sites is not None:
            sites.down.add(h, p.gate, p.lora.scale, self.kernels)

    def _attend(self, kv: torch.Tensor, active: list[int], p: _Pass, sliced: bool) -> None:
        """p.attn[:, heads] = attention of the active query heads over the view's keys and values."""
        if p.small:
            stats = (p.stats.prob_sum, p.stats.row_count) if p.stats is not None else (None, None)
            self.kernels.attend(p.attn, p.q, kv, active, p.positions, p.key_positions, self._scale, *stats)
            return
        k, v = kv[0].float(), kv[1].float()
        if p.stats is None and sliced and active != p.full_heads:
            self._attend_groups(k, v, active, p)
            return
        if p.stats is None:
            # [1, H, M, D] x [1, Hkv, T, D]: PyTorch's fused CPU attention, grouped-query without copying K/V.
            out = F.scaled_dot_product_attention(p.q.transpose(0, 1)[None], k[None], v[None],
                                                 attn_mask=p.fused_mask(), is_causal=p.causal,
                                                 scale=self._scale, enable_gqa=True)
            p.attn.copy_(out[0].transpose(0, 1))
            return
        g_size = self.config.heads_per_group
        for g, kept in enumerate(active):
            if kept:
                heads = slice(g * g_size, g * g_size + kept)
                self._attend_explicit(p.q[:, heads], k[g], v[g], p, p.attn[:, heads])

    def _attend_groups(self, k: torch.Tensor, v: torch.Tensor, active: list[int], p: _Pass) -> None:
        """Fused attention per KV group over its active query heads; the group's one K/V head is broadcast (a view)."""
        g_size, (t, d) = self.config.heads_per_group, k.shape[1:]
        for g, kept in enumerate(active):
            if kept:
                heads = slice(g * g_size, g * g_size + kept)
                out = F.scaled_dot_product_attention(
                    p.q[:, heads].transpose(0, 1)[None], k[g].expand(1, kept, t, d), v[g].expand(1, kept, t, d),
                    attn_mask=p.fused_mask(), is_causal=p.causal, scale=self._scale)
                p.attn[:, heads].copy_(out[0].transpose(0, 1))

    def _attend_explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: _Pass,
                         out: torch.Tensor) -> None:
        """Attention of q [M, h, D] over one KV head (k, v [T, D]) with probabilities materialised for statistics."""
        m, heads, _ = q.shape
        for r0 in range(0, m, _STATS_ROW_CHUNK):
            rows = slice(r0, min(r0 + _STATS_ROW_CHUNK, m))
            scores = torch.einsum("mhd,td->hmt", q[rows], k) * self._scale  # [h, rows, T]
            if p.mask is not None:
                scores.masked_fill_(~p.mask[None, rows], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[rows] = torch.einsum("hmt,td->mhd", probs, v)
            if p.stats is not None:
                p.stats.prob_sum += probs.sum(dim=(0, 1))
                if p.mask is not None:
                    p.stats.row_count += p.mask[rows].sum(0) * heads
                else:
                    p.stats.row_count += (rows.stop - rows.start) * heads
