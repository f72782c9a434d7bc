"""ElastiLM as a service: the runtime's decisions are feasible under the measured table or refused with the floor,
the full level on the full prompt answers as the unreordered model does, the self-induced label questions never
touch evaluation items, decision training leaves the SLO-token rows fixed, and an elastic request through the live
service (official `openai` client for chat, httpx for /v1/elastic/choose) returns its chosen (m, p) and timings.

The artifacts are built small here (a 2 x 16-token calibration, a two-point latency table, a decision branch trained
for one epoch on a handful of windows): real code paths at test size, not the prepared quality."""

from __future__ import annotations

import uuid

import httpx
import pytest
import torch
from openai import OpenAI

from llmaas.elastic.artifact import ElasticArtifact
from llmaas.elastic.build import build_artifact
from llmaas.elastic.calibration import CalibrationConfig
from llmaas.elastic.choices import score_choices
from llmaas.elastic.decision_labels import derive_labels, label_questions, slo_grid
from llmaas.elastic.decision_train import DecisionExample, DecisionTrainConfig, train_decision_branch
from llmaas.elastic.dual_head import (
    SLO_TOKENS,
    DualHeadTLM,
    DualHeadTokenizer,
    build_window,
    default_heads_path,
    encoder_fingerprint,
    save_heads,
    slo_rows,
)
from llmaas.elastic.latency import LatencyConfig, measured_feasible, write_profile
from llmaas.elastic.model import ElasticModel
from llmaas.elastic.runtime import ElasticRuntime
from llmaas.elastic.slo import ALL_CONFIGS, Config, SloRequest
from llmaas.engine.worker import EngineConfig
from llmaas.errors import SloUnreachableError
from llmaas.model.linear import BF16
from llmaas.model.loader import load_model
from llmaas.paths import DataDir, tiny_lm_dir
from llmaas.service.server import ServeOptions, Service
from llmaas.tlm.encoder import BertEncoder

CONTEXT = ("Answer the science question.\n\nQuestion: What do plants need to make food?\nAnswer: sunlight\n\n"
           "Question: Which organ pumps blood through the body?\nAnswer: the heart\n\n")
QUESTION = "Question: What is the boiling point of water at sea level?\nAnswer:"
CHOICES = [" 100 degrees Celsius", " 50 degrees Celsius", " 10 degrees Celsius", " 0 degrees Celsius"]


def _small_decision_head(tlm: DualHeadTLM, tok: DualHeadTokenizer) -> dict:
    """One epoch on eight real windows with arbitrary targets: trained, not good."""
    examples = [DecisionExample(build_window(tok, pre, 10, CONTEXT, QUESTION).ids, i % 10, i % 9)
                for i, pre in enumerate(range(2, 10))]
    for e in examples:
        ids = torch.tensor([e.ids])
        e.hidden = tlm.shared(ids, torch.ones_like(ids))[0].detach().to(torch.bfloat16)
    return train_decision_branch(tlm, examples[:6], examples[6:], DecisionTrainConfig(epochs=1, batch_size=4),
                                 log=lambda *_: None)


@pytest.fixture(scope="module")
def elastic_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("elastic")
    fresh = load_model()
    build_artifact(fresh, d, CalibrationConfig(num_samples=2, num_tokens=16), log=lambda *_: None)
    elastic = ElasticModel(fresh, ElasticArtifact.load(d, fresh.model_id), {}, d)
    write_profile(elastic, LatencyConfig(prompt_lengths=(32, 128), runs=1, decode_steps=2, tlm_tokens=(64, 128)))
    folder = tiny_lm_dir()
    tlm = DualHeadTLM(BertEncoder.load(folder))
    trained = _small_decision_head(tlm, DualHeadTokenizer(folder / "tokenizer.json", tlm.base_vocab_size))
    save_heads(tlm, default_heads_path(d), encoder_fingerprint(folder),
               {"decision_branch": "trained", "decision": {"questions": 0, **trained}, "test_fixture": True})
    return d


@pytest.fixture(scope="module")
def runtime(elastic_dir):
    return ElasticRuntime.open(load_model(), elastic_dir)


LOOSE = SloRequest(ttft_ms=1e6, tpot_ms=1e6)  # met by any config, however noisy the test-size table


def test_every_plan_is_feasible_under_the_measured_table(runtime):
    table = runtime.table
    for slo in (LOOSE, SloRequest(1.0, 1.0), SloRequest(0.8, 0.9), SloRequest(0.6, 0.8)):
        try:
            plan = runtime.plan(CONTEXT, QUESTION, 40, slo)
        except SloUnreachableError:  # the tight ones may be, on a two-point table measured on a busy machine
            assert slo is not LOOSE
            continue
        feasible = measured_feasible(table, plan.budgets_s, plan.compressed.original_tokens, 40, plan.tlm_s)
        assert feasible(plan.config)
        assert plan.config == plan.predicted or not feasible(plan.predicted)  # repaired only when it had to be
        report = plan.report(plan.predicted_ttft_s, 0.0)
        assert {"level", "prompt_ratio", "prompt_tokens_kept", "ttft_s", "tpot_s", "slo_met"} <= set(report)
        assert report["prompt_tokens_kept"] == plan.compressed.tokens <= plan.compressed.original_tokens


def test_an_unreachable_slo_is_refused_with_the_floor(runtime):
    with pytest.raises(SloUnreachableError, match=r"floor here: TTFT \d+ ms = [\d.]+ of the full model's"):
        runtime.plan(CONTEXT, QUESTION, 40, SloRequest(ttft_ms=0.01))
    with pytest.raises(ValueError, match="fraction"):
        SloRequest(ttft=1.5)


def test_full_level_on_the_full_prompt_answers_as_the_original_model(runtime):
    original = load_model()
    reordered = runtime.score(CONTEXT, QUESTION, CHOICES, 10)
    plain = score_choices(original.model, original.tokenizer, CONTEXT, QUESTION, CHOICES, None, None)
    # bf16 prefill: the reordered down sums its rounded products in another order (measured 7e-3)
    tol = 3e-2 if original.gemm == BF16 else 1e-3
    assert max(abs(a - b) for a, b in zip(reordered, plain, strict=True)) < tol
    assert len(runtime.score("", QUESTION, CHOICES, 2)) == 4  # a context compressed to nothing still scores
    out = runtime.choose(CONTEXT, QUESTION, CHOICES, LOOSE)
    assert 0 <= out.choice < 4 and len(out.scores) == 4 and out.ttft_s >= out.plan.tlm_s > 0


def test_the_lingua2_baseline_compresses_to_s_pre_forcing_questions_and_line_breaks(runtime):
    """§10.2's prompt side: the score head at rate s_pre, "?" and "\n" forced, the query never an input."""
    from llmaas.bench.elastic_baselines import OwnModelBaselines
    from llmaas.elastic.slo import Slo
    context = CONTEXT * 3
    out = OwnModelBaselines.lingua2_prompt(runtime, context, QUESTION, Slo(4, 7))
    questions = [w for w in context.split() if "?" in w]
    assert [w for w in out.split() if "?" in w] == questions  # every one kept, in order
    assert set(out.split()) <= set(context.split()) and out.count("\n") >= 6  # whole words; the lines survive
    forced = sum(runtime.count_tokens(" " + w) for w in questions)
    # The rate counts the kept words; the line breaks kept across dropped words come on top (12-19 tokens here, over
    # 25 random score heads, whose word tokens were 35-45 against a target of 47.6).
    words = sum(runtime.count_tokens(" " + w) for w in out.split())
    assert words <= max(0.4 * runtime.count_tokens(context), forced) + 8
    assert runtime.count_tokens(out) < 0.7 * runtime.count_tokens(context)
    assert OwnModelBaselines.lingua2_prompt(runtime, context, QUESTION, Slo(10, 10)) == context


def test_label_questions_avoid_the_few_shot_examples_and_every_evaluation_item():
    from llmaas.bench.mc_tasks import arc_easy, mmlu
    questions = label_questions(40)
    assert len({q.context for q in questions}) == 2  # MMLU dev and ARC-Easy train, alternately
    assert not any(q.question.removeprefix("Question: ").removesuffix("\nAnswer:") in q.context for q in questions)
    evaluated = {i.question for task in (arc_easy(300), mmlu(300)) for i in task.items}
    assert not evaluated & {q.question for q in questions}
    assert len({q.key for q in questions}) == 40 and 5 <= sum(q.held_out for q in questions) <= 15


def test_labels_follow_the_rule_on_a_hand_made_grid():
    # correct only at (0.6, 0.3) and (0.9, 1.0): under the proxy at SLO (1.0, 1.0) the label is the largest
    # correct m; at (0.2, 0.5) neither is feasible (m = 0.6 > 0.5), so it falls back to the smallest feasible config
    correct = {f"{c.m},{c.p}": (c.m, c.p) in ((6, 3), (9, 10)) for c in ALL_CONFIGS}
    rows = {"q": {"correct": correct, "context_tokens": 100, "query_tokens": 20, "encoder_tokens": 150}}
    labels = {(s.prefill, s.decode): (c, fb) for _, s, c, fb in derive_labels(rows, "proxy", None)}
    assert len(labels) == len(slo_grid()) == 54
    assert labels[(10, 10)] == (Config(9, 10), False)
    assert labels[(4, 7)] == (Config(6, 3), False)  # 0.6 x 0.3 <= 0.4; m = 0.9 misses the prefill SLO
    assert labels[(2, 5)] == (Config(2, 1), True)


def test_decision_training_leaves_the_slo_rows_fixed(elastic_dir, runtime):
    word = runtime.tlm.word.weight
    base = runtime.tlm.base_vocab_size
    expected = slo_rows(word[:base], len(SLO_TOKENS))
    assert torch.equal(word[base:], expected)  # the saved, trained heads were loaded over fixed rows
    assert not runtime.tlm.word.weight.requires_grad


@pytest.fixture(scope="module")
def service(tmp_path_factory, elastic_dir):
    home = DataDir(tmp_path_factory.mktemp("svc")).create()
    options = ServeOptions(home, port=0, engine=EngineConfig(max_pending=8), elastic=True, elastic_dir=elastic_dir)
    svc = Service(options, loaded=load_model()).start_background()
    yield svc
    svc.close()


def _key(service: Service) -> str:
    return service.catalog.add_app(f"app-{uuid.uuid4().hex[:8]}")[1]


def test_an_elastic_chat_through_the_openai_client_reports_its_choice(service):
    ai = OpenAI(api_key=_key(service), base_url=f"http://127.0.0.1:{service.port}/v1", max_retries=0)
    r = ai.chat.completions.create(model=service.state.model_id, max_tokens=8, temperature=0,
                                   messages=[{"role": "system", "content": CONTEXT},
                                             {"role": "user", "content": "What is the boiling point of water?"}],
                                   extra_body={"llmaas": {"slo": {"ttft_ms": 1e6, "tpot": 1.0}}})
    ext = r.model_extra["llmaas"]
    assert ext["level"] in [m / 10 for m in range(2, 11)] and ext["prompt_ratio"] in [p / 10 for p in range(1, 11)]
    assert 0 <= ext["prompt_tokens_kept"] <= ext["context_tokens"] and isinstance(ext["slo_met"], bool)
    assert ext["ttft_s"] > ext["tlm_s"] > 0 and r.usage.completion_tokens >= 1
    stream = ai.chat.completions.create(model=service.state.model_id, max_tokens=4, stream=True,
                                        messages=[{"role": "user", "content": "Hi"}],
                                        extra_body={"llmaas": {"slo": {"ttft_ms": 60_000}}})
    chunks = list(stream)
    assert chunks[-1].model_extra["llmaas"]["prompt_tokens_kept"] == 0  # no system message: nothing to compress


def test_choose_through_the_service_and_its_refusals(service):
    headers = {"Authorization": f"Bearer {_key(service)}"}
    url = f"http://127.0.0.1:{service.port}/v1"
    body = {"context": CONTEXT, "question": QUESTION, "choices": CHOICES, "slo": {"ttft_ms": 1e6, "tpot_ms": 1e6}}
    r = httpx.post(f"{url}/elastic/choose", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert 0 <= out["choice"] < 4 and len(out["scores"]) == 4 and out["llmaas"]["slo_met"] in (True, False)
    r = httpx.post(f"{url}/elastic/choose", json={**body, "slo": {"ttft_ms": 0.01}}, headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "slo_unreachable" and "floor" in r.text
    r = httpx.post(f"{url}/elastic/choose", json={**body, "slo": {}}, headers=headers, timeout=60)
    assert r.status_code == 400
    ctx = httpx.post(f"{url}/contexts", headers=headers, timeout=60).json()["id"]
    chat = {"model": service.state.model_id, "messages": [{"role": "user", "content": "Hi"}],
            "llmaas": {"context_id": ctx, "slo": {"ttft": 0.5}}}
    r = httpx.post(f"{url}/chat/completions", json=chat, headers=headers, timeout=60)
    assert r.status_code == 400 and "persistent context always runs at the full level" in r.text


def test_without_elastic_an_slo_names_the_command_that_builds_it(tmp_path, smollm):
    home = DataDir(tmp_path / "home").create()
    svc = Service(ServeOptions(home, port=0), loaded=smollm).start_background()
    try:
        headers = {"Authorization": f"Bearer {_key(svc)}"}
        body = {"context": "", "question": "Q", "choices": [" a", " b"], "slo": {"ttft": 0.5}}
        r = httpx.post(f"http://127.0.0.1:{svc.port}/v1/elastic/choose", json=body, headers=headers, timeout=60)
        assert r.status_code == 409 and "llmaas elastic prepare" in r.text and "--elastic" in r.text
    finally:
        svc.close()


def test_latency_rounds_interleave_every_setting_and_drop_the_warm_up():
    from llmaas.elastic.latency import in_rounds
    calls: list[str] = []

    def measure(key: str):
        return lambda: calls.append(key) or len(calls)
    out = in_rounds({"a": measure("a"), "b": measure("b")}, runs=2)
    assert calls == ["a", "b"] * 3  # one call of each per round, round after round
    assert out == {"a": [3, 5], "b": [4, 6]}  # the warm-up round's results are dropped


def test_a_remeasured_latency_table_makes_prepare_retrain_the_decision_head(tmp_path, monkeypatch):
    """Labels under the measured rule follow the table's feasibility: after `llmaas elastic profile` measures a
    different table (a faster engine), `prepare` must derive them again and retrain, not keep the old head."""
    from llmaas.elastic import prepare as prep
    from llmaas.elastic.decision_labels import LABEL_SOURCES
    from llmaas.elastic.latency import LatencyTable
    (tmp_path / "latency.json").write_text('{"levels": "first measurement"}')
    recipe = prep.RECIPES["fast"]
    record = {"decision_branch": "trained", "decision": {
        "questions": recipe.decision.questions, "sources": list(LABEL_SOURCES),
        "train_on_fallbacks": recipe.decision.train_on_fallbacks, "latency_table": LatencyTable.digest(tmp_path)}}
    monkeypatch.setattr(prep, "heads_record", lambda path: record)
    assert prep._decided(tmp_path, recipe)
    (tmp_path / "latency.json").write_text('{"levels": "measured again"}')
    assert not prep._decided(tmp_path, recipe)
