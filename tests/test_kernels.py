"""Native kernels against plain PyTorch: exact block layouts, matmuls on row/column ranges, attention with masking,
fp16 KV, partial heads and statistics, and the element-wise ops."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from llmaas.model.gguf_file import TensorInfo
from llmaas.model.weights import Q4Blocks, read_blocks
from tiny_gguf import _random_blocks


class _Tensor:
    """A quantised matrix as the loader sees it: its header description and its bytes."""

    def __init__(self, qtype: QType, data: np.ndarray, rows: int, cols: int) -> None:
        self.info, self.data = TensorInfo("t", (cols, rows), qtype, 0, data.nbytes), data


def _make(qtype: QType, rows: int = 96, cols: int = 512, seed: int = 0) -> tuple[_Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    if qtype in (QType.Q4_K, QType.Q6_K):
        data = _random_blocks(qtype, rows, cols, rng)
    else:
        data = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    return _Tensor(qtype, data, rows, cols), torch.from_numpy(gguf.quants.dequantize(data, qtype))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q8_0])
def test_block_layout_holds_gguf_weights_exactly(qtype):
    t, dense = _make(qtype)
    blocks = read_blocks(t.info, t.data)
    assert blocks is not None
    assert torch.equal(blocks.dequantize(), dense)


def test_types_without_an_exact_block_layout_have_none():
    t, _ = _make(QType.Q6_K)
    assert read_blocks(t.info, t.data) is None


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q4_K, QType.Q8_0])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_block_matmul_matches_dense_on_ranges(kernels, qtype, m):
    t, dense = _make(qtype)
    b = read_blocks(t.info, t.data)
    x = torch.randn(m, 512)
    for r0, r1, c0, c1 in [(0, 96, 0, 512), (10, 70, 64, 448), (0, 33, 32, 80), (5, 6, 0, 17)]:
        y = torch.full((m, r1 - r0), 7.0)
        xs = x[:, c0:c1]
        args = (b.qs, b.scales, b.mins) if isinstance(b, Q4Blocks) else (b.qs, b.scales)
        fn = kernels.q4_matmul if isinstance(b, Q4Blocks) else kernels.q8_matmul
        fn(y, xs, *args, r0, r1, c0, c1, False)
        ref = xs @ dense[r0:r1, c0:c1].T
        # activations are rounded to 16 bits per 32-value block: error <= 2^-16 * sum |w| * block max |x|
        bound = 1e-4 * (xs.abs() @ dense[r0:r1, c0:c1].abs().T) + 1e-6
        assert torch.all((y - ref).abs() <= bound)
        fn(y, xs, *args, r0, r1, c0, c1, True)
        assert torch.all((y - 2 * ref).abs() <= 2 * bound)


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0])
@pytest.mark.parametrize("m", [1, 5])
def test_block_matmul_on_several_ranges_matches_dense(kernels, qtype, m):
    """Several row and column ranges in one call: full-width buffers, absolute indices, untouched outside."""
    t, dense = _make(qtype)
    b = read_blocks(t.info, t.data)
    x = torch.randn(m, 512)
    # touching ranges (joined by the kernel) and an empty one, as a sub-model's full KV groups give
    rows, cols = [(0, 10), (10, 10), (10, 24), (32, 70), (90, 96)], [(0, 64), (64, 96), (128, 200), (256, 512)]
    args = (b.qs, b.scales, b.mins) if isinstance(b, Q4Blocks) else (b.qs, b.scales)
    fn = kernels.q4_matmul_ranges if isinstance(b, Q4Blocks) else kernels.q8_matmul_ranges
    flat_rows, flat_cols = [i for r in rows for i in r], [i for c in cols for i in c]
    y = torch.full((m, 96), 7.0)
    fn(y, x, *args, flat_rows, flat_cols, False)
    active = torch.cat([torch.arange(r0, r1) for r0, r1 in rows])
    kept = torch.cat([torch.arange(c0, c1) for c0, c1 in cols])
    ref = x[:, kept] @ dense[active][:, kept].T
    bound = 1e-4 * (x[:, kept].abs() @ dense[active][:, kept].abs().T) + 1e-6
    assert torch.all((y[:, active] - ref).abs() <= bound)
    untouched = torch.ones(96, dtype=torch.bool)
    untouched[active] = False
    assert torch.all(y[:, untouched] == 7.0)
    fn(y, x, *args, flat_rows, flat_cols, True)
    assert torch.all((y[:, active] - 2 * ref).abs() <= 2 * bound)
    with pytest.raises(RuntimeError, match="must not share a block"):
        fn(y, x, *args, flat_rows, [0, 40, 32, 96], False)  # 32..40 read twice
    with pytest.raises(RuntimeError, match="full-width"):
        fn(y[:, :90], x, *args, flat_rows, flat_cols, False)


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0])
def test_prefetching_weight_rows_changes_no_result(kernels, qtype):
    """The read-ahead of a sub-model's row prefixes is a hint: bit-identical outputs with it off, short and long."""
    t, _ = _make(qtype, rows=300)
    b = read_blocks(t.info, t.data)
    x = torch.randn(2, 512)
    args = (b.qs, b.scales, b.mins) if isinstance(b, Q4Blocks) else (b.qs, b.scales)
    fn = kernels.q4_matmul if isinstance(b, Q4Blocks) else kernels.q8_matmul
    outs, default = [], kernels.set_prefetch_bytes(0)
    try:
        for ahead in (0, 64, default, 1 << 20):
            kernels.set_prefetch_bytes(ahead)
            y = torch.empty(2, 300)
            fn(y, x[:, :192], *args, 0, 300, 0, 192, False)
            outs.append(y)
    finally:
        kernels.set_prefetch_bytes(default)
    assert all(torch.equal(outs[0], y) for y in outs[1:])


@pytest.mark.parametrize("m", [1, 5])
def test_lora_add_matches_reference(kernels, m):
    """Several adapters on one input, column and row ranges of full-width buffers: the deltas land on the right rows
    and nowhere else, and mis-shaped adapters are refused."""
    x, scale = torch.randn(m, 100), 1.5
    cols = [(0, 10), (20, 50)]
    # ranks 4, 8 and 16; the rank-16 adapter's 19 rows take the eight-rows-at-once path twice, then three alone
    adapters = [(torch.randn(4, 40), torch.randn(12, 4), [(0, 5), (30, 37)]), (torch.randn(8, 40), torch.randn(3, 8),
                                                                               [(60, 63)]),
                (torch.randn(16, 40), torch.randn(19, 16), [(40, 59)])]
    out = torch.full((m, 64), 7.0)
    kernels.lora_add(out, x, [a for a, _, _ in adapters], [b for _, b, _ in adapters],
                     [[i for r in rows for i in r] for _, _, rows in adapters], [i for c in cols for i in c], scale)
    ref = torch.full((m, 64), 7.0)
    xs = torch.cat([x[:, c0:c1] for c0, c1 in cols], dim=1)
    for a, b, rows in adapters:
        ref[:, torch.cat([torch.arange(r0, r1) for r0, r1 in rows])] += scale * (xs @ a.T) @ b.T
    assert (out - ref).abs().max().item() < 1e-4
    assert torch.equal(out[:, 37:40], torch.full((m, 3), 7.0)) and torch.equal(out[:, 59:60], torch.full((m, 1), 7.0))
    with pytest.raises(RuntimeError, match="total row-range length"):
        kernels.lora_add(out, x, [adapters[0][0]], [adapters[0][1]], [[0, 5]], [0, 10, 20, 50], scale)
    with pytest.raises(RuntimeError, match="out of bounds"):
        kernels.lora_add(out, x, [adapters[0][0]], [adapters[0][1]], [[0, 5, 60, 67]], [0, 10, 20, 50], scale)


def test_lora_add_reads_fp16_adapters_as_served(kernels):
    """A served adapter is stored as fp16: the kernel widens each value, so it adds what fp32 arithmetic on the
    rounded weights gives; adapters of mixed dtypes are refused."""
    x, scale = torch.randn(2, 64), 0.5
    a, b = torch.randn(8, 64).half(), torch.randn(19, 8).half()  # 19 rows: two blocks of eight, then three alone
    out = torch.zeros(2, 40)
    kernels.lora_add(out, x, [a], [b], [[0, 10, 25, 34]], [0, 64], scale)
    ref = torch.zeros(2, 40)
    ref[:, torch.cat([torch.arange(0, 10), torch.arange(25, 34)])] = scale * (x @ a.float().T) @ b.float().T
    assert (out - ref).abs().max().item() < 1e-4
    with pytest.raises(RuntimeError, match="all float32 or all float16"):
        kernels.lora_add(out, x, [a, a.float()], [b, b], [[0, 10, 25, 34], [0, 19]], [0, 64], scale)


def _attention_reference(q, k, v, active, q_pos, k_pos):
    group = q.shape[1] // k.shape[0]
    kr, vr = k.float().repeat_interleave(group, 0), v.float().repeat_interleave(group, 0)
    scores = torch.einsum("mhd,htd->mht", q, kr) / q.shape[-1] ** 0.5
    mask = k_pos[None, None, :] <= q_pos[:, None, None]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    heads = torch.tensor([j < active[h // group] for h in range(q.shape[1]) for j in [h % group]])
    probs = probs * heads[None, :, None]
    return torch.einsum("mht,htd->mhd", probs, vr), probs.sum((0, 1)), (mask.float() * heads[None, :, None]).sum(
        (0, 1))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("active", [(3, 3, 3), (2, 0, 1)])
def test_attend_matches_reference(kernels, kv_dtype, active):
    torch.manual_seed(0)
    q = torch.randn(3, 9, 64)
    k, v = torch.randn(3, 70, 64).to(kv_dtype), torch.randn(3, 70, 64).to(kv_dtype)
    q_pos, k_pos = torch.tensor([10, 40, 69]), torch.randperm(70)  # keys in any slot order, some after the query
    out = torch.full_like(q, 5.0)
    prob_sum, row_count = torch.zeros(70), torch.zeros(70)
    kernels.attend(out, q, torch.stack([k, v]), list(active), q_pos, k_pos, 64 ** -0.5, prob_sum, row_count)
    ref, ref_sum, ref_count = _attention_reference(q, k, v, active, q_pos, k_pos)
    for h in range(9):
        if h % 3 < active[h // 3]:  # fp16 keys/values are exact in fp32 arithmetic, so one tolerance fits both
            assert torch.allclose(out[:, h], ref[:, h], atol=1e-4)
        else:
            assert torch.all(out[:, h] == 5.0), "inactive heads must be left untouched"
    assert torch.allclose(prob_sum, ref_sum, atol=1e-5)
    assert torch.equal(row_count, ref_count)


def test_elementwise_kernels(kernels):
    torch.manual_seed(1)
    x, w = torch.randn(3, 576), torch.randn(576)
    y = torch.empty(3, 576)
    kernels.rms_norm(y, x, w, 1e-5)
    assert torch.allclose(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w, atol=1e-5)
    g, u, out = torch.randn(2, 100), torch.randn(2, 100), torch.empty(2, 100)
    kernels.silu_mul(out, g, u)
    assert torch.allclose(out, torch.nn.functional.silu(g) * u, atol=1e-6)
    from llmaas.model.rope import RopeTable

    table = RopeTable(64, 1e5, 1000)
    x = torch.randn(2, 9, 64)
    a, b = x.clone(), x.clone()
    pos = torch.tensor([3, 999])
    kernels.rope_(a, pos, table.cos, table.sin)
    table.apply_(b, pos)
    assert torch.allclose(a, b, atol=1e-5)


def test_a_build_left_half_done_by_a_killed_process_does_not_hang_the_next_start(kernels):
    """torch's build baton is a plain file that a killed build leaves behind; every later start then waited on it
    forever. Under llmaas's own OS lock a baton can only be a leftover, so it is removed."""
    from llmaas.kernels import build_name
    from llmaas.paths import cache_dir
    baton = cache_dir() / "kernels" / build_name() / "lock"
    baton.touch()
    out = subprocess.run([sys.executable, "-c", "from llmaas.kernels import load_kernels; load_kernels()"],
                         capture_output=True, text=True, timeout=60)  # before the fix: forever
    assert out.returncode == 0, out.stderr
    assert not baton.exists() and "interrupted" in out.stderr
