"""ElastiLM at run time (ELASTILM.md §8): one pass of the dual-head tiny LM picks (model level m, prompt ratio p) for
a request's SLO, the pick is repaired to what the measured latency table says is feasible, the refinable context is
compressed word by word, and the chosen sub-model answers: a multiple-choice pick (§9's log-likelihood) or, through
the engine's generator, a chat reply.

Owns the request-level orchestration and what a request is told about it (ElasticPlan.report). The refinable
context is only ever the context: the query (question and choices, or the chat's other messages) is never
compressed, and p is the fraction of everything the LLM reads that remains (§6's context ratio). Feasibility is
measured: the tiny LM's own time counts toward TTFT (§8 as decided for llmaas). An SLO that no config meets on the
prompt is refused with the floor. Ignores HTTP and queueing (the engine runs these calls on its compute thread) and
how the artifacts are built (`llmaas elastic prepare`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmaas.elastic.choices import score_choices
from llmaas.elastic.dual_head import (
    DualHeadTLM,
    DualHeadTokenizer,
    default_heads_path,
    encoder_fingerprint,
    heads_record,
    load_heads,
    run_dual_head,
)
from llmaas.elastic.latency import LatencyTable, measured_feasible, predicted_ttft_s
from llmaas.elastic.model import ElasticModel, SubModel
from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
from llmaas.elastic.slo import (
    ALL_CONFIGS,
    PROMPT_RATIOS,
    Config,
    Slo,
    SloRequest,
    kept_context_tokens,
    proxy_feasible,
    repair,
)
from llmaas.engine.generate import Generator
from llmaas.errors import ElasticUnavailableError, SloUnreachableError
from llmaas.model.linear import BF16
from llmaas.model.loader import LoadedModel
from llmaas.prompt.compress import Compressed, compress
from llmaas.tlm.encoder import BertEncoder

PREPARE = "llmaas elastic prepare"


@dataclass(frozen=True)
class ElasticPlan:
    """What one request runs and why."""

    config: Config  # what runs, after repair
    predicted: Config  # what the decision head said
    slo_tokens: Slo  # the SLO tokens the tiny LM read
    budgets_s: tuple[float, float]  # TTFT and TPOT budgets (inf where the request set none)
    full_s: tuple[float, float]  # the full model's TTFT on the uncompressed prompt and its TPOT, from the table
    compressed: Compressed  # the refinable context as the LLM reads it
    query_tokens: int  # LLM tokens read that are never compressed
    tlm_s: float  # the tiny LM's pass (counts toward TTFT)
    predicted_ttft_s: float  # the table's TTFT of `config`, the tiny LM included

    @property
    def repaired(self) -> bool:
        return self.config != self.predicted

    def report(self, ttft_s: float, tpot_s: float | None) -> dict:
        """The reply's `llmaas` extension: what was chosen and what happened. slo_met compares the measured TTFT
        (tiny LM + prefill, queueing excluded) and TPOT with the budgets."""
        ttft_budget, tpot_budget = self.budgets_s
        met = ttft_s <= ttft_budget and (tpot_s is None or tpot_s <= tpot_budget)
        read = self.compressed.tokens + self.query_tokens
        return {"level": self.config.m / 10, "prompt_ratio": self.config.p / 10,
                "prompt_tokens_kept": self.compressed.tokens, "context_tokens": self.compressed.original_tokens,
                "realized_prompt_ratio": read / max(1, self.compressed.original_tokens + self.query_tokens),
                "ttft_s": ttft_s, "tpot_s": tpot_s, "slo_met": met, "tlm_s": self.tlm_s,
                "predicted": {"level": self.predicted.m / 10, "prompt_ratio": self.predicted.p / 10},
                "repaired": self.repaired, "predicted_ttft_s": self.predicted_ttft_s,
                "budget_s": {"ttft": _finite(ttft_budget), "tpot": _finite(tpot_budget)},
                "full_model_s": {"ttft": self.full_s[0], "tpot": self.full_s[1]}}


@dataclass(frozen=True)
class ChooseOutcome:
    choice: int
    scores: list[float]
    plan: ElasticPlan
    ttft_s: float  # the tiny LM's pass + compression + scoring: until the answer is known


class ElasticRuntime:
    def __init__(self, elastic: ElasticModel, tlm: DualHeadTLM, tok: DualHeadTokenizer, table: LatencyTable) -> None:
        self.elastic, self.tlm, self.tok, self.table = elastic, tlm.eval(), tok, table
        self.tokenizer = elastic.loaded.tokenizer
        self._generators: dict[int, Generator] = {}

    @staticmethod
    def missing(directory: Path, require_decision: bool = True, gemm: str | None = None) -> list[str]:
        """The artifacts a runtime needs that are not built yet (empty when it can open). LoRA adapters are not
        among them: a level without one runs unrecovered (the service warns). Without require_decision an untrained
        decision branch is accepted (what labelling it needs). With `gemm`, a latency table measured on another prefill
        path counts as missing."""
        from llmaas.elastic.artifact import ARTIFACT_FILE
        out = [] if (directory / ARTIFACT_FILE).exists() else ["the reordering artifact"]
        record = heads_record(default_heads_path(directory))
        out += ["the tiny LM's heads"] if record is None else \
            ["the tiny LM's decision head"] if require_decision and record.get("decision_branch") == "untrained" else []
        try:
            LatencyTable.load(directory, gemm)
        except (FileNotFoundError, ValueError):
            out.append(f"the latency table{f' measured on the {gemm} prefill path' if gemm else ''}")
        return out

    @classmethod
    def open(cls, loaded: LoadedModel, directory: Path, require_decision: bool = True) -> ElasticRuntime:
        """The runtime over the service's own resident model: it is reordered in place once (the full level stays
        the same function, ELASTIC.md), so one copy of the weights serves every level."""
        missing = cls.missing(directory, require_decision, loaded.gemm)
        if missing:
            raise ElasticUnavailableError(f"elastic requests need {', '.join(missing)} (in {directory}); build them "
                                          f"all with `{PREPARE}`")
        from llmaas.elastic.artifact import ElasticArtifact
        from llmaas.elastic.lora_store import load_adapter
        from llmaas.paths import tiny_lm_dir
        artifact = ElasticArtifact.load(directory, loaded.model_id)
        adapters, records = {}, {}
        for m in MODEL_LEVELS:
            found = load_adapter(directory, m, loaded.config, artifact.levels[m])
            if found is not None:
                adapters[m], records[m] = found
        folder = tiny_lm_dir()
        tlm = DualHeadTLM(BertEncoder.load(folder))
        load_heads(tlm, default_heads_path(directory), encoder_fingerprint(folder))
        tlm.serve_bf16 = loaded.gemm == BF16  # as the latency table measured it (latency.tlm_latency)
        tok = DualHeadTokenizer(folder / "tokenizer.json", tlm.base_vocab_size)
        return cls(ElasticModel(loaded, artifact, adapters, directory, records), tlm, tok,
                   LatencyTable.load(directory, loaded.gemm))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_bos=False)) if text else 0

    def choice_query_tokens(self, question: str, choices: list[str]) -> int:
        """LLM tokens of a multiple-choice query as scored (the question, a space if empty, and every choice)."""
        return self.count_tokens(question or " ") + sum(self.count_tokens(c) for c in choices)

    def plan(self, context: str, query_text: str, query_tokens: int, slo: SloRequest, *, proxy: bool = False,
             refuse: bool = True) -> ElasticPlan:
        """Decide one request: `context` is the refinable part, `query_text` what the tiny LM reads after it, and
        `query_tokens` how many LLM tokens are read besides the context (never compressed). Feasibility is the
        measured table's, or the paper's m·p proxy (evaluation only). When no config is feasible the request is
        refused (SloUnreachableError, the service) or runs the cheapest config as a counted miss (evaluation)."""
        context_tokens = self.count_tokens(context)
        full = (self.table.ttft_s(10, context_tokens + query_tokens), self.table.tpot_s(10))
        budgets, tenths = slo.budgets_s(*full), slo.tenths(*full)
        started = time.perf_counter()
        out = run_dual_head(self.tlm, self.tok, tenths.prefill, tenths.decode, context, query_text)
        tlm_s = time.perf_counter() - started
        feasible = proxy_feasible(tenths) if proxy else \
            measured_feasible(self.table, budgets, context_tokens, query_tokens, tlm_s)
        if refuse and not any(feasible(c) for c in ALL_CONFIGS):
            raise self._unreachable(budgets, full, context_tokens, query_tokens, tlm_s)
        predicted = Config(MODEL_LEVELS[int(out.m_logits.argmax())], PROMPT_RATIOS[int(out.p_logits.argmax())])
        config, _ = repair(predicted, feasible)
        target = kept_context_tokens(config.p, context_tokens, query_tokens)
        compressed = compress(context, out.word_scores, target, self.count_tokens)
        return ElasticPlan(config, predicted, tenths, budgets, full, compressed, query_tokens, tlm_s,
                           tlm_s + predicted_ttft_s(self.table, config, context_tokens, query_tokens))

    def _unreachable(self, budgets: tuple[float, float], full: tuple[float, float], context_tokens: int,
                     query_tokens: int, tlm_s: float) -> SloUnreachableError:
        fastest = min(ALL_CONFIGS, key=lambda c: predicted_ttft_s(self.table, c, context_tokens, query_tokens))
        ttft_floor = tlm_s + predicted_ttft_s(self.table, fastest, context_tokens, query_tokens)
        tpot_floor = min(self.table.tpot_s(m) for m in MODEL_LEVELS)
        return SloUnreachableError(
            f"no model level and prompt ratio meets this SLO on this {context_tokens + query_tokens}-token prompt. "
            f"The floor here: TTFT {ttft_floor * 1e3:.0f} ms = {ttft_floor / full[0]:.2f} of the full model's "
            f"{full[0] * 1e3:.0f} ms (level {model_level_name(fastest.m)} at prompt ratio {fastest.p / 10}, with the "
            f"tiny LM's {tlm_s * 1e3:.0f} ms), and TPOT {tpot_floor * 1e3:.1f} ms = {tpot_floor / full[1]:.2f} of "
            f"{full[1] * 1e3:.1f} ms; asked: TTFT {_ms(budgets[0])}, TPOT {_ms(budgets[1])}. Relax the SLO or "
            "shorten the prompt.")

    def sub_model(self, m: int) -> SubModel:
        return self.elastic.view(m)

    @torch.inference_mode()
    def choose(self, context: str, question: str, choices: list[str], slo: SloRequest) -> ChooseOutcome:
        """A multiple-choice request: the question and every choice are read whole; the answer is the choice with
        the highest mean token log-probability under the chosen sub-model."""
        started = time.perf_counter()
        plan = self.plan(context, mc_query_text(question, choices), self.choice_query_tokens(question, choices), slo)
        scores = self.score(plan.compressed.text, question, choices, plan.config.m)
        best = max(range(len(scores)), key=scores.__getitem__)
        return ChooseOutcome(best, scores, plan, time.perf_counter() - started)

    def score(self, context: str, question: str, choices: list[str], m: int) -> list[float]:
        sub = self.sub_model(m)
        return score_choices(self.elastic.loaded.model, self.tokenizer, context, question, choices, sub.widths,
                             sub.lora)

    def generator(self, m: int, prefill_chunk_tokens: int) -> Generator:
        """The chat generator of level m (with its LoRA): built once per level, sharing the resident weights."""
        if m not in self._generators:
            sub = self.sub_model(m)
            self._generators[m] = Generator(self.elastic.loaded.model, self.tokenizer, prefill_chunk_tokens,
                                            widths=sub.widths, lora=sub.lora)
        return self._generators[m]


def mc_query_text(question: str, choices: list[str]) -> str:
    """What the decision branch reads of a multiple-choice query: the question, then each choice on its own line
    (the artifact left the question out, §11.4; llmaas includes it)."""
    return "\n".join([question, *(c.strip() for c in choices)])


def _finite(x: float) -> float | None:
    return None if x == float("inf") else x


def _ms(x: float) -> str:
    return "none" if x == float("inf") else f"{x * 1e3:.1f} ms"
