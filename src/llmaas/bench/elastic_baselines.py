"""The baselines of `llmaas bench elastic` that run a model of their own rather than widths of the resident one:
LaCo (merged layers, ELASTILM.md §10.5) and Lingua2+Contextual (prompt compression at rate s_pre with forced "\\n"
and "?", plus DejaVu-style FFN sparsity at keep s_dec, §10.2).

Owns their artifacts' first build (the LaCo plans, about 3 minutes here, and the sparsity predictor, about 12; both
cached under the elastic directory, so later runs only load them), their models per ratio (built on first use) and
the Lingua2 prompt side. Both run on a second, unreordered copy of the model: neither a merge nor a per-layer
predictor is invariant to the neuron order that ElastiLM's reordering changed. Lingua2's compressor is the llmaas
score head (LLMLingua-2's own model is not available offline, §10.2's decision), so the two compressors differ only
in how much they keep and what they force. Ignores scoring and statistics (elastic_serving.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llmaas.elastic.dual_head import run_dual_head
from llmaas.elastic.laco import MergedLayer, build_plans, laco_model, load_plans
from llmaas.elastic.model_levels import MODEL_LEVELS
from llmaas.elastic.runtime import ElasticRuntime
from llmaas.elastic.slo import Slo
from llmaas.elastic.sparsity import SparsityPredictor, build_predictor, load_predictor, sparse_model
from llmaas.model.loader import LoadedModel, load_model
from llmaas.model.transformer import Transformer
from llmaas.prompt.compress import compress
from llmaas.prompt.words import split_words

FORCED_CHARACTERS = ("?",)  # LLMLingua-2's force_tokens "\n" and "?": "\n" is kept by the rebuild (keep_newlines)


class OwnModelBaselines:
    def __init__(self, original: LoadedModel, plans: dict[int, list[MergedLayer]],
                 predictor: SparsityPredictor) -> None:
        self.original, self.plans, self.predictor = original, plans, predictor
        self._laco: dict[int, Transformer] = {}
        self._sparse: dict[int, Transformer] = {}

    @classmethod
    def open(cls, directory: Path, log: Callable[[str], object] = print) -> OwnModelBaselines:
        """Load a second copy of the model as stored and each artifact, building what is missing (with progress)."""
        original = load_model()
        plans = load_plans(directory, original.model_id)
        if plans is None or any(r not in plans for r in MODEL_LEVELS[:-1]):
            log("LaCo: no merge plans yet for this model; walking every ratio (about 3 min, once)")
            build_plans(original, directory, list(MODEL_LEVELS[:-1]), log)
            plans = load_plans(directory, original.model_id)
        predictor = load_predictor(directory, original)
        if predictor is None:
            log("Lingua2+Contextual: no sparsity predictor yet; training it (about 12 min, once)")
            build_predictor(original, directory, log=log)
            predictor = load_predictor(directory, original)
        assert plans is not None and predictor is not None
        return cls(original, plans, predictor)

    def laco(self, ratio10: int) -> Transformer:
        """The collapsed model keeping ⌊r·L⌋ layers (the model itself at 1.0)."""
        if ratio10 == 10:
            return self.original.model
        if ratio10 not in self._laco:
            self._laco[ratio10] = laco_model(self.original, self.plans[ratio10])
        return self._laco[ratio10]

    def sparse(self, keep10: int) -> Transformer:
        if keep10 not in self._sparse:
            self._sparse[keep10] = sparse_model(self.original, self.predictor, keep10 / 10)
        return self._sparse[keep10]

    @staticmethod
    def lingua2_prompt(runtime: ElasticRuntime, context: str, query_text: str, slo: Slo) -> str:
        """The context compressed to s_pre of its LLM tokens by the score head, every word holding a "?" kept and
        line breaks kept across dropped words."""
        if slo.prefill == 10 or not context:
            return context
        out = run_dual_head(runtime.tlm, runtime.tok, slo.prefill, slo.decode, context, query_text)
        forced = [any(ch in w.text for ch in FORCED_CHARACTERS) for w in split_words(context)]
        target = max(1, round(slo.prefill / 10 * runtime.count_tokens(context)))
        return compress(context, out.word_scores, target, runtime.count_tokens, forced=forced,
                        keep_newlines=True).text
