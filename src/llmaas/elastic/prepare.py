"""`llmaas elastic prepare`: every offline artifact that elastic requests need, in order, each stage skipped when its
output is already there and resumable when stopped part-way.

Owns the sequence (reordering artifact -> LoRA adapters -> latency table -> score head -> decision head), the two
recipes (fast: the default, sized to finish within 45 minutes on 2 cores; quality: the slower one whose figures
docs/ELASTIC_SERVING.md lists), progress with an ETA from the recipe's expected stage times, and the record of each
stage's wall time (`prepare.json`). Ignores what each stage does (its own module).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from llmaas.elastic.artifact import ARTIFACT_FILE, elastic_dir
from llmaas.elastic.decision_labels import LABEL_SOURCES
from llmaas.elastic.decision_train import DecisionTrainConfig
from llmaas.elastic.dual_head import default_heads_path, heads_record
from llmaas.elastic.latency import LatencyTable
from llmaas.elastic.model_levels import MODEL_LEVELS
from llmaas.model.loader import LoadedModel, load_model


@dataclass(frozen=True)
class PrepareRecipe:
    name: str
    lora_steps: int  # per level, on the scaled CPU recipe's schedule
    score_segments: int
    score_epochs: int
    score_budget_s: float
    decision: DecisionTrainConfig
    expected_s: dict[str, float]  # per stage on 2 idle cores (Zen 4), for the ETA only


RECIPES = {
    # Stage times measured here (AMD EPYC Zen 4, 2 cores): LoRA ~80-110 s a level at 30 steps, score-head labels
    # ~0.7 s a segment, decision-head questions ~38 s each (90 configs, each a prefill and a scoring pass).
    # The decision head trains up to 8 epochs (the best held-out one kept): at 96 questions, a 180-s cap stopped it
    # after 2 of 4 epochs with held-out accuracy equal to the majority guess; 8 epochs learned the level (m 0.67
    # against 0.45; 2026-12-06). At the default 16 questions 8 epochs take about 3 minutes.
    "fast": PrepareRecipe("fast", 30, 600, 2, 150.0, DecisionTrainConfig(questions=16, epochs=8, budget_s=600.0),
                          {"artifact": 50, "lora": 900, "profile": 180, "score_head": 600, "decision_head": 850}),
    "quality": PrepareRecipe("quality", 100, 2000, 3, 360.0,
                             DecisionTrainConfig(questions=200, epochs=8, budget_s=900.0),
                             {"artifact": 50, "lora": 2900, "profile": 180, "score_head": 1800,
                              "decision_head": 7000}),
}
STAGES = ("artifact", "lora", "profile", "score_head", "decision_head")


def prepare(recipe: PrepareRecipe, model_path: str | None = None, directory: Path | None = None,
            use_kernels: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every stage that is not done yet; returns (and writes to prepare.json) what ran and how long it took."""
    started = time.perf_counter()

    def load() -> LoadedModel:
        return load_model(model_path, use_kernels=use_kernels)

    probe = load()
    directory = directory or elastic_dir(probe.model_id)
    directory.mkdir(parents=True, exist_ok=True)
    record: dict = {"recipe": asdict(recipe), "model": probe.model_id, "stages_s": {}, "skipped": []}
    steps: dict[str, tuple[Callable[[], bool], Callable[[], None]]] = {
        "artifact": (lambda: (directory / ARTIFACT_FILE).exists(), lambda: _artifact(probe, directory, log)),
        "lora": (lambda: _lora_done(directory, recipe), lambda: _lora(load(), directory, recipe, log)),
        "profile": (lambda: _profiled(directory, probe.gemm),
                    lambda: _profile(model_path, directory, use_kernels)),
        "score_head": (lambda: heads_record(default_heads_path(directory)) is not None,
                       lambda: _score_head(load(), directory, recipe, log)),
        "decision_head": (lambda: _decided(directory, recipe), lambda: _decision_head(load(), directory, recipe, log)),
    }
    for i, name in enumerate(STAGES, 1):
        done_check, run = steps[name]
        if done_check():
            log(f"[prepare {i}/{len(STAGES)}] {name}: already built, skipped")
            record["skipped"].append(name)
            continue
        left = sum(recipe.expected_s[s] for s in STAGES[i - 1:] if s not in record["skipped"])
        log(f"[prepare {i}/{len(STAGES)}] {name}: starting ({time.perf_counter() - started:.0f} s so far; "
            f"ETA about {left / 60:.0f} min for the rest)")
        t = time.perf_counter()
        run()
        record["stages_s"][name] = time.perf_counter() - t
        log(f"[prepare {i}/{len(STAGES)}] {name}: done in {record['stages_s'][name]:.0f} s")
    record["total_s"] = time.perf_counter() - started
    (directory / "prepare.json").write_text(json.dumps(record, indent=1))
    log(f"elastic artifacts ready in {directory} ({record['total_s'] / 60:.1f} min); serve them with "
        "`llmaas serve --elastic`")
    return record


def _artifact(loaded: LoadedModel, directory: Path, log: Callable[[str], None]) -> None:
    from llmaas.elastic.build import build_artifact
    build_artifact(loaded, directory, log=log)


def _lora_done(directory: Path, recipe: PrepareRecipe) -> bool:
    from llmaas.elastic.lora_store import adapter_record
    return all((r := adapter_record(directory, m)) is not None and r["steps"] >= recipe.lora_steps
               for m in MODEL_LEVELS[:-1])


def _lora(loaded: LoadedModel, directory: Path, recipe: PrepareRecipe, log: Callable[[str], None]) -> None:
    from llmaas.elastic.lora_train import recipe as lora_recipe
    from llmaas.elastic.lora_train import train_artifact_levels
    train_artifact_levels(loaded, list(MODEL_LEVELS[:-1]), lora_recipe("scaled", steps=recipe.lora_steps), None,
                          directory)


def _profiled(directory: Path, gemm: str) -> bool:
    try:
        LatencyTable.load(directory, gemm)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _profile(model_path: str | None, directory: Path, use_kernels: bool) -> None:
    from llmaas.elastic.latency import LatencyConfig, write_profile
    from llmaas.elastic.model import ElasticModel
    write_profile(ElasticModel.open(model_path, directory, use_kernels=use_kernels),
                  LatencyConfig())


def _score_head(loaded: LoadedModel, directory: Path, recipe: PrepareRecipe, log: Callable[[str], None]) -> None:
    from llmaas.elastic.score_train import ScoreTrainConfig, build_score_head
    config = replace(ScoreTrainConfig(), epochs=recipe.score_epochs, budget_s=recipe.score_budget_s)
    r = build_score_head(loaded, directory, recipe.score_segments, config, log)
    log(f"score head: held-out ROC AUC {r['held_out_auc']:.4f} (random head {r['held_out_auc_init']:.4f})")


def _decided(directory: Path, recipe: PrepareRecipe) -> bool:
    record = heads_record(default_heads_path(directory))
    return record is not None and record.get("decision_branch") == "trained" \
        and record["decision"]["questions"] >= recipe.decision.questions \
        and record["decision"].get("sources") == list(LABEL_SOURCES) \
        and record["decision"].get("train_on_fallbacks") == recipe.decision.train_on_fallbacks \
        and (recipe.decision.rule != "measured"
             or record["decision"].get("latency_table") == LatencyTable.digest(directory))


def _decision_head(loaded: LoadedModel, directory: Path, recipe: PrepareRecipe, log: Callable[[str], None]) -> None:
    from llmaas.elastic.decision_train import build_decision_head
    from llmaas.elastic.runtime import ElasticRuntime
    runtime = ElasticRuntime.open(loaded, directory, require_decision=False)
    r = build_decision_head(runtime, directory, recipe.decision, log)
    acc, base = r["held_out_accuracy"], r["majority_accuracy"]
    log(f"decision head: held-out accuracy p {acc['p']:.3f} / m {acc['m']:.3f} / both {acc['both']:.3f} "
        f"(majority guess {base['p']:.3f} / {base['m']:.3f} / {base['both']:.3f}); fallback rate "
        f"{r['labels']['fallback_rate']:.3f}")
