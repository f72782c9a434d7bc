"""`llmaas elastic build`'s work: calibration batch -> layer scores and anchors -> Taylor importance -> unit orders
and the level table -> the saved artifact. Each stage is timed (the offline cost the spec asks for).

Owns the sequence and its progress lines. Ignores applying the result (elastic/model.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from llmaas.elastic.artifact import ElasticArtifact
from llmaas.elastic.calibration import CALIBRATION_SOURCE, CalibrationConfig, calibration_batch
from llmaas.elastic.importance import taylor_importance
from llmaas.elastic.layer_scores import measure_layer_scores
from llmaas.elastic.model_levels import MODEL_LEVELS, level_widths
from llmaas.elastic.reorder import layer_order
from llmaas.model.loader import LoadedModel


def build_artifact(loaded: LoadedModel, directory: Path, calibration: CalibrationConfig | None = None,
                   log=print) -> ElasticArtifact:
    """Measure and save the artifact for an unreordered model (a fresh load: this never changes its weights)."""
    c = loaded.config
    calibration = calibration or CalibrationConfig()
    timings = {}
    t0 = time.perf_counter()
    batch = calibration_batch(loaded.tokenizer, calibration)
    log(f"calibration: {batch.shape[0]} x {batch.shape[1]} tokens from {CALIBRATION_SOURCE}, "
        f"seed {calibration.seed}")

    def progress(done: int, total: int) -> None:
        if done % 5 == 0 or done == total:
            elapsed = time.perf_counter() - t0
            log(f"  leave-one-out: {done}/{total} layers, {elapsed:.0f} s, ETA {elapsed / done * (total - done):.0f} s")

    scores = measure_layer_scores(loaded.model, batch, progress)
    anchors = scores.anchors()
    timings["layer_scores_s"] = time.perf_counter() - t0
    log(f"anchors (top {len(anchors)} by leave-one-out loss; base {scores.base_loss:.3f}): {anchors}")
    t1 = time.perf_counter()
    importance = taylor_importance(loaded.model, batch)
    timings["importance_s"] = time.perf_counter() - t1
    log(f"Taylor importance: {importance.heads.shape[0]} layers x {c.n_heads} heads / {c.ffn_dim} neurons, "
        f"{timings['importance_s']:.1f} s")
    elastic_layers = [i for i in range(c.n_layers) if i not in anchors]
    orders = {i: layer_order(c, importance.heads[i], importance.neurons[i]) for i in elastic_layers}
    # widths are read off the importance of the units in their new (reordered) slots
    sorted_heads = importance.heads.clone()
    for i, order in orders.items():
        sorted_heads[i] = importance.heads[i][order.heads]
    levels = {m: level_widths(c, sorted_heads, set(anchors), m) for m in MODEL_LEVELS}
    artifact = ElasticArtifact(loaded.model_id, {"source": CALIBRATION_SOURCE, **asdict(calibration)}, scores,
                               tuple(anchors), importance.heads, importance.neurons, orders, levels, timings)
    path = artifact.save(directory)
    log(f"saved {path}")
    return artifact
