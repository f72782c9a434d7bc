"""The KV-compression evaluation: text metrics on hand-worked examples, the chunk plumbing, the fp16 variant's
compressed-KV path against the plain path, and a whole (tiny-model) run's JSON shape."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmaas.bench import eval_kv
from llmaas.bench.eval_kv import EvalConfig, SegmentKV, VariantTally, from_chunks, ppl_window, to_chunks, variant_policy
from llmaas.bench.kv_tasks import TASKS, make_item
from llmaas.bench.text_metrics import chrf, lcs_length, match_label, mean_ci95, rouge_l
from llmaas.cli import eval as eval_cli
from llmaas.engine.conversation import Conversation
from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.loader import load_model
from llmaas.model.stats import AttentionStats
from tiny_gguf import write_tiny_llama

# -- metrics -------------------------------------------------------------------------------------------------------


def test_lcs_length():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the CLRS example
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_hand_examples():
    # LCS "the cat on the mat" = 5 of 6 words each way: P = R = F = 5/6
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 -> F = 2 * 1 * 0.5 / 1.5 = 2/3; case and punctuation do not matter
    assert rouge_l("Police said.", "the police have said") == pytest.approx(2 / 3)
    assert rouge_l("Same words, same order!", "same words same order") == 1.0
    assert rouge_l("nothing shared", "entirely different") == 0.0
    assert rouge_l("", "a reference") == 0.0


def test_chrf_hand_examples():
    # "ab" vs "abc": 1-grams P = 2/2, R = 2/3; 2-grams P = 1/1, R = 1/2; no 3-grams in "ab" (order skipped).
    # P = 1, R = 7/12, F2 = 5 * 7/12 / (4 + 7/12) = 7/11
    assert chrf("ab", "abc") == pytest.approx(100 * 7 / 11)
    assert chrf("a b", "ab") == 100.0  # whitespace is removed
    assert chrf("xyz", "abc") == 0.0
    assert chrf("", "abc") == 0.0
    # sacreBLEU's value for this pair (chrF2, char order 6, as quoted in the HF `chrf` metric card)
    assert chrf("The relationship between Obama and Netanyahu is not exactly friendly.",
                "The ties between Obama and Netanyahu are not particularly friendly.") == pytest.approx(61.5763793781)


def test_match_label_takes_the_first_whole_word_keyword():
    labels = {"Sports": ("sports", "sport"), "Sci/Tech": ("sci/tech", "technology", "tech"), "World": ("world",)}
    assert match_label("The topic is Sports.", labels) == "Sports"
    assert match_label("Technology, not world news", labels) == "Sci/Tech"
    assert match_label("sci/tech", labels) == "Sci/Tech"
    assert match_label("a sportsman", labels) is None
    assert match_label("", labels) is None


def test_mean_ci95():
    mean, lo, hi = mean_ci95([0.0, 1.0, 0.0, 1.0])
    half = 1.96 * math.sqrt(1 / 3) / 2  # sample sd of 0,1,0,1 is sqrt(1/3)
    assert (mean, lo, hi) == pytest.approx((0.5, 0.5 - half, 0.5 + half))
    assert mean_ci95([0.3]) == (0.3, 0.3, 0.3)


# -- chunk plumbing -------------------------------------------------------------------------------------------------

SPEC = KVSpec(n_layers=3, n_kv_heads=2, head_dim=8)


def random_kv(n_tokens: int, capacity: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, SPEC.n_kv_heads, capacity, SPEC.head_dim, generator=g).half() for _ in range(SPEC.n_layers)]


def test_chunks_round_trip_with_a_partial_tail():
    kv = random_kv(37, 40)
    k, v = to_chunks(kv, 37, 16)
    assert k.shape == (3, 3, 2, 16, 8)  # [N, L, Hkv, C, D]
    assert torch.equal(k[2, :, :, 5:], torch.zeros(3, 2, 11, 8))  # padding
    back = from_chunks(k, v, 37)
    for layer in range(3):
        assert torch.equal(back[:, layer].half(), kv[layer][:, :, :37])


def test_context_kv_levels_and_write():
    geom = ChunkGeometry(SPEC, 16)
    kv = random_kv(70, 80)  # 4 sealed chunks + a 6-token tail
    density = torch.tensor([1.0] * 16 + [0.1] * 16 + [0.5] * 16 + [0.01] * 16 + [0.2] * 6)
    ctx = SegmentKV.build(kv, 70, density, geom)
    assert ctx.chunk_densities == pytest.approx([1.0, 0.1, 0.5, 0.01])
    assert ctx.levels("int2", 0.5) == [KVLevel.INT2] * 5  # uniform: the tail too
    paper = ctx.levels("llms_paper", 0.5)
    assert paper[-1] == KVLevel.INT8  # the partial tail stays INT8
    assert sum(int(lv) for lv in paper[:4]) == 4 * 4  # nominal 0.5 of INT8 over the sealed chunks
    cache = DenseKVCache(SPEC, 80)
    cache.append(70)
    ctx.write(ctx.levels("fp16", 0.5), cache)
    for layer in range(3):
        assert torch.equal(cache.kv[layer][:, :, :70], kv[layer][:, :, :70])
    ctx.write(ctx.levels("int8", 0.5), cache)
    err = max((cache.kv[layer][:, :, :70].float() - kv[layer][:, :, :70].float()).abs().max() for layer in range(3))
    assert 0 < err < 0.05  # INT8 of unit-normal values: half a step of max|x|/127


# -- on a tiny model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf"), use_kernels=False)


def plain_nll(loaded, ids_a, ids_b, *, stats: bool) -> float:
    """B[1:] after A without the harness: prefill A, then teacher-force B."""
    n_a, n_b = ids_a.numel(), ids_b.numel()
    cache = DenseKVCache(KVSpec.from_config(loaded.config), n_a + n_b)
    s = AttentionStats.zeros(n_a) if stats else None
    loaded.model.forward(ids_a, torch.arange(n_a), cache.append(n_a), stats=s)
    logits = loaded.model.forward(ids_b, torch.arange(n_a, n_a + n_b), cache.append(n_b))[:-1]
    return -torch.log_softmax(logits, -1).gather(1, ids_b[1:, None]).sum().item()


def test_fp16_variant_equals_the_uncompressed_path(tiny):
    rng = random.Random(0)
    ids = torch.tensor([rng.randrange(256) for _ in range(96)])
    ids_a, ids_b = ids[:64], ids[64:]
    tallies: dict[str, VariantTally] = {}
    spec = KVSpec.from_config(tiny.config)
    policies = {v: variant_policy(v, 0.5) for v in ("fp16", "int2")}
    ppl_window(tiny.model, spec, ids_a, ids_b, ChunkGeometry(spec), policies, tallies)
    fp16 = tallies["fp16"]
    assert fp16.nll_sum == plain_nll(tiny, ids_a, ids_b, stats=True)  # bit for bit
    assert fp16.nll_sum == pytest.approx(plain_nll(tiny, ids_a, ids_b, stats=False), rel=1e-5)  # other attention
    assert fp16.kl_sum == 0.0 and fp16.top1_sum == 31
    assert tallies["int2"].nll_sum != fp16.nll_sum and tallies["int2"].kl_sum > 0


def test_evaluate_shape_on_the_tiny_model(tiny):
    conversation = Conversation(tiny.tokenizer, tiny.chat_template)
    items = [make_item(TASKS["sst2"], f"t{i}", text, gold, tiny.tokenizer, conversation, max_doc_tokens=24)
             for i, (text, gold) in enumerate([("a fine film", "positive"), ("dull and long", "negative")])]
    rng = random.Random(1)
    text = "".join(rng.choice("abcdefgh ") for _ in range(400))
    cfg = EvalConfig(ppl_windows=2, ppl_context_tokens=64, ppl_target_tokens=32, limit=2, tasks=("sst2",))
    result = eval_kv.evaluate(tiny, cfg, text, items)
    assert list(result["variants"]) == list(eval_kv.VARIANTS)
    for r in result["variants"].values():
        assert set(r) == {"ppl", "bytes_per_token", "accuracy"}
        assert set(r["accuracy"]) == {"sst2"} and 0 <= r["accuracy"]["sst2"] <= 1
        assert r["ppl"] > 1
    # tiny model: 2 layers x 2 KV heads x 64 dims; fp16 = 2 (K, V) x 256 values x 2 bytes per token, no scales
    assert result["variants"]["fp16"]["bytes_per_token"] == 1024
    assert result["bytes"]["int8"]["effective_ratio"] == 1.0
    assert result["bytes"]["llms_paper"]["nominal_ratio"] == pytest.approx(0.5, abs=0.05)
    assert result["fidelity"]["fp16"]["kl_to_fp16"] == 0.0
    assert result["agree_fp16"]["fp16"]["sst2"] == 1.0
    assert "ppl" in eval_kv.table(result)


def test_cli_dispatch(capsys):
    assert eval_cli.main([]) == 0
    assert "llmaas eval {kv,elastic}" in capsys.readouterr().out
    assert eval_cli.main(["nope"]) == 2
