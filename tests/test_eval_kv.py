"""The KV-compression evaluation: text metrics on hand-worked examples, the chunk plumbing, the fp16 variant's
compressed-KV path against the plain path, and a whole (tiny-model) run's JSON shape; the level sweep's band splits
and the level-error measurement (`--sweep`, `--level-error`)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from llmaas.bench import eval_kv, kv_level_error, kv_level_sweep
from llmaas.bench.eval_kv import EvalConfig, SegmentKV, VariantTally, ppl_window, variant_policy
from llmaas.bench.kv_tasks import TASKS, make_item
from llmaas.bench.text_metrics import chrf, lcs_length, match_label, mean_ci95, rouge_l
from llmaas.cli import eval as eval_cli
from llmaas.cli import eval_kv as eval_kv_cli
from llmaas.engine.conversation import Conversation
from llmaas.kv import codec
from llmaas.kv.chunking import contiguous_spans, cut_chunks, join_chunks
from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.memory.kv_levels import budget_units
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
    k, v = cut_chunks(kv, contiguous_spans(37, 16), 16)
    assert k.shape == (3, 3, 2, 16, 8)  # [N, L, Hkv, C, D]
    assert torch.equal(k[2, :, :, 5:], torch.zeros(3, 2, 11, 8))  # padding
    back = join_chunks(k, v, 37)
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


# -- the level sweep (--sweep) ----------------------------------------------------------------------------------------

COST = {KVLevel.INT8: 4, KVLevel.INT4: 2, KVLevel.INT2: 1}  # budget units, as in memory.kv_levels


def test_band_splits_spend_the_budget_along_the_order():
    geom = ChunkGeometry(SPEC, 16)
    densities = [0.9, 0.1, 0.5, 0.3, 0.05, 0.7]  # 6 sealed chunks, then a 5-token tail
    density = torch.tensor([d for d in densities for _ in range(16)] + [0.2] * 5)
    ctx = SegmentKV.build(random_kv(101, 101), 101, density, geom)
    assert kv_level_sweep.chunk_order(ctx, "density", 0) == [0, 5, 2, 3, 1, 4]
    assert kv_level_sweep.chunk_order(ctx, "inverse", 0) == [4, 1, 3, 2, 5, 0]
    assert kv_level_sweep.chunk_order(ctx, "recency", 0) == [5, 4, 3, 2, 1, 0]
    shuffled = kv_level_sweep.chunk_order(ctx, "random", 7)
    assert sorted(shuffled) == list(range(6)) and shuffled == kv_level_sweep.chunk_order(ctx, "random", 7)
    for ratio in (0.375, 0.5):
        most = kv_level_sweep.max_int8_chunks(6, ratio)
        for order in kv_level_sweep.ORDERS:
            for n8 in range(most + 2):  # one past the most: the budget caps it
                levels = kv_level_sweep.banded(n8, order, ratio, 3)(ctx)
                assert levels[-1] == KVLevel.INT8 and len(levels) == 7  # the tail stays INT8
                sealed = levels[:6]
                assert sum(COST[lv] for lv in sealed) == budget_units(6, ratio)  # byte-equal splits
                ranked = [sealed[i] for i in kv_level_sweep.chunk_order(ctx, order, 3)]
                assert ranked == sorted(ranked, reverse=True)  # rank-contiguous bands, most protected first
                assert ranked.count(KVLevel.INT8) == min(n8, most)
    policies = kv_level_sweep.sweep_policies(64, 0.5, 0)
    assert list(policies)[:len(eval_kv.VARIANTS)] == list(eval_kv.VARIANTS)  # fp16 first: the reference
    assert [p for p in policies if p.startswith("density")] == [f"density n8={n}" for n in (0, 1, 2, 4, 8, 14, 21)]
    assert [p for p in policies if p.startswith("inverse")] == ["inverse n8=0", "inverse n8=8", "inverse n8=21"]


def test_sweep_on_the_tiny_model(tiny):
    rng = random.Random(2)
    text = "".join(rng.choice("abcdefgh ") for _ in range(400))
    cfg = EvalConfig(ppl_windows=2, ppl_context_tokens=64, ppl_target_tokens=32)
    result = kv_level_sweep.sweep(tiny, cfg, text)
    rows = result["policies"]
    assert list(rows) == list(kv_level_sweep.sweep_policies(4, 0.5, 0))
    assert rows["fp16"]["ppl_increase_pct"] == 0.0 and rows["fp16"]["kl_to_fp16"] == 0.0
    assert rows["density n8=0"]["level_fractions"] == {"INT4": 1.0}
    assert rows["density n8=0"]["ppl"] == rows["int4"]["ppl"]  # all INT4 either way (no tail to differ)
    assert rows["density n8=1"]["level_fractions"] == {"INT2": 0.5, "INT4": 0.25, "INT8": 0.25}
    for r in rows.values():
        assert set(r) == {"ppl", "ppl_increase_pct", "kl_to_fp16", "top1_agreement", "level_fractions",
                          "effective_ratio"}
    assert len(result["density_skew_per_window"]) == 2 and set(result["density_skew_median"]) == set(
        result["density_skew_per_window"][0])
    assert all(sum(split) == 4 for splits in result["llms_splits"].values() for split in splits)
    assert result["config"]["windows"] == 2 and "density n8=1" in kv_level_sweep.table(result)
    with pytest.raises(ValueError, match="at least 3 chunks"):
        kv_level_sweep.sweep(tiny, EvalConfig(ppl_windows=1, ppl_context_tokens=32, ppl_target_tokens=8), text)


# -- level errors (--level-error) -------------------------------------------------------------------------------------

def test_level_errors_on_the_tiny_model(tiny):
    rng = random.Random(3)
    seqs = [torch.tensor([rng.randrange(256) for _ in range(48)]) for _ in range(2)]
    spec = KVSpec.from_config(tiny.config)
    geom = ChunkGeometry(spec, 16)
    levels = kv_level_error.level_errors(tiny.model, spec, seqs, geom)
    assert list(levels) == ["INT8", "INT4", "INT2"]
    assert levels["INT8"]["e"] == levels["INT8"]["k_vs_int8"] == 0.0
    assert 0 < levels["INT8"]["k_vs_fp16"] < levels["INT4"]["k_vs_fp16"] < levels["INT2"]["k_vs_fp16"]
    assert 0 < levels["INT4"]["e"] < levels["INT2"]["e"] < 1
    # One sequence, recomputed by hand through the codec's one-call encode (INT8, then requantized inside)
    one = kv_level_error.level_errors(tiny.model, spec, seqs[:1], geom)
    cache = DenseKVCache(spec, 48)
    tiny.model.forward(seqs[0], torch.arange(48), cache.append(48))
    k, v = cut_chunks(cache.kv, contiguous_spans(48, 16), 16)
    k8, v8 = codec.decode(codec.encode(k, v, KVLevel.INT8, geom), KVLevel.INT8, geom)
    k2, v2 = codec.decode(codec.encode(k, v, KVLevel.INT2, geom), KVLevel.INT2, geom)
    e2 = (((k8 - k2) ** 2).sum() / (k8 ** 2).sum() + ((v8 - v2) ** 2).sum() / (v8 ** 2).sum()).item() / 2
    assert one["INT2"]["e"] == pytest.approx(e2, rel=1e-5)
    assert "| INT2 |" in kv_level_error.markdown(levels)


def test_level_error_run_keeps_the_other_entries(tiny, tmp_path, monkeypatch):
    rng = random.Random(4)
    monkeypatch.setattr(kv_level_error, "calibration_ids",
                        lambda tokenizer, cfg: [torch.tensor([rng.randrange(256) for _ in range(cfg.seq_tokens)])])
    path = tmp_path / "kv_codec.json"
    path.write_text(json.dumps({"axis_study": {"rows": []}, "level_error": {"old": True}}))
    entry = kv_level_error.run(tiny, kv_level_error.LevelErrorConfig(num_seqs=1, seq_tokens=32), path)
    doc = json.loads(path.read_text())
    assert doc["axis_study"] == {"rows": []} and doc["level_error"] == json.loads(json.dumps(entry))
    assert set(entry) == {"data", "levels", "command", "model", "machine", "threads", "runtime_s"}
    with pytest.raises(ValueError, match="whole number"):
        kv_level_error.LevelErrorConfig(num_seqs=1, seq_tokens=40)


def test_eval_kv_modes_exclude_each_other():
    parser = eval_kv_cli.build_parser()
    assert parser.parse_args(["--sweep"]).sweep and parser.parse_args(["--level-error"]).level_error
    with pytest.raises(SystemExit):
        parser.parse_args(["--sweep", "--level-error"])
    with pytest.raises(SystemExit):
        eval_kv_cli.main(["--sweep", "--png", "x.png"])  # refused before any model loads
