"""The dual-head TLM (ELASTILM.md §6-7): frozen SLO-token rows, exact branch copies, the window layout, saving, and
the score-head labels made by the real SmolLM."""

from __future__ import annotations

import pytest
import torch

from llmaas.elastic.dual_head import (
    MAX_TOKENS,
    SLO_TOKENS,
    DualHeadTLM,
    DualHeadTokenizer,
    build_window,
    build_windows,
    load_heads,
    run_dual_head,
    save_heads,
    slo_rows,
)
from llmaas.elastic.score_labels import Segment, keep_top, label_segment, word_token_ids
from llmaas.elastic.score_train import IGNORE, roc_auc, token_labels
from llmaas.errors import ModelFileError
from llmaas.paths import tiny_lm_dir
from llmaas.prompt.words import split_words
from llmaas.tlm.encoder import BertEncoder
from llmaas.tlm.tokenizer import pad_batch


@pytest.fixture(scope="module")
def encoder() -> BertEncoder:
    return BertEncoder.load(tiny_lm_dir())


@pytest.fixture(scope="module")
def tok(encoder: BertEncoder) -> DualHeadTokenizer:
    return DualHeadTokenizer(tiny_lm_dir() / "tokenizer.json", encoder.config.vocab_size)


def _batch(tok: DualHeadTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [build_window(tok, 3, 7, "The cat sat on the mat.", " Where?").ids,
            build_window(tok, 10, 5, "A longer context, with commas and more words in it.").ids]
    return pad_batch(rows, 0)


def test_slo_rows_are_frozen_scaled_basis_vectors(encoder: BertEncoder, tok: DualHeadTokenizer) -> None:
    model = DualHeadTLM(encoder)
    base = model.base_vocab_size
    expected = slo_rows(encoder.word.weight, len(SLO_TOKENS))
    median = encoder.word.weight.norm(dim=1).median()
    assert torch.equal(expected.abs().argmax(dim=1), torch.arange(len(SLO_TOKENS)))  # 15 distinct basis vectors
    assert torch.allclose(expected.norm(dim=1), median.expand(len(SLO_TOKENS)))
    before = [p.detach().clone() for p in model.score_layers.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # everything: only what has gradients may move
    ids, mask = _batch(tok)
    assert set(ids[:, 1:3].flatten().tolist()) <= set(range(base, base + len(SLO_TOKENS)))
    keep, p, m = model(ids, mask)
    assert keep.shape == (*ids.shape, 2) and p.shape == (2, 10) and m.shape == (2, 9)
    (keep.square().mean() + p.square().mean() + m.square().mean()).backward()
    opt.step()
    assert torch.equal(model.word.weight[base:], expected)
    assert torch.equal(model.word.weight[:base], encoder.word.weight)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.score_layers.parameters(), strict=True))


def test_branches_start_as_exact_copies_of_layers_4_to_6(encoder: BertEncoder, tok: DualHeadTokenizer) -> None:
    model = DualHeadTLM(encoder)
    ids, mask = _batch(tok)
    ids = ids.clamp(max=encoder.config.vocab_size - 1)  # the plain encoder has no SLO rows
    states = encoder.encode(ids, mask)
    h = model.shared(ids, mask)
    assert torch.equal(h, states[3])
    key_mask = mask[:, None, None, :]
    for branch in (model.score_layers, model.decision_layers):
        x = h
        for layer in branch:
            x = layer(x, key_mask)
        assert torch.equal(x, states[6])
        assert branch[0].query.weight is not encoder.layers[3].query.weight  # a copy, not a shared module


def test_window_cuts_the_context_from_its_end_never_the_query(tok: DualHeadTokenizer) -> None:
    context = "word " * 600
    w = build_window(tok, 2, 5, context, "Question: which? Answer:")
    assert len(w.ids) == MAX_TOKENS and w.ids[-1] == tok.sep_id
    query_ids = tok.encode("Question: which? Answer:")[0]
    assert w.ids[-1 - len(query_ids):-1] == query_ids
    assert w.context_offsets[3] == (0, 4) and w.num_context_chars < len(context)


def test_long_context_is_scored_in_windows_that_cover_every_word(encoder: BertEncoder,
                                                                  tok: DualHeadTokenizer) -> None:
    context = " ".join(f"w{i}" for i in range(400))  # 2-3 WordPiece tokens a word: several windows
    windows = build_windows(tok, 4, 6, context, "Question?")
    assert len(windows) >= 2 and all(len(w.ids) <= MAX_TOKENS for w in windows)
    spans = [s for w in windows for s in w.context_offsets if s is not None]
    assert spans == tok.encode(context)[1]  # every context token once, in order
    assert tok.encode("Question?")[0] == windows[0].ids[-3:-1] and windows[-1].ids[1:3] == windows[0].ids[1:3]
    out = run_dual_head(DualHeadTLM(encoder), tok, 4, 6, context, "Question?")
    assert len(out.word_scores) == 400 and all(s > float("-inf") for s in out.word_scores)
    assert out.p_logits.shape == (10,) and out.m_logits.shape == (9,)


def test_token_labels_follow_words_through_offsets(tok: DualHeadTokenizer) -> None:
    text = "Unbelievably, tokenizers split words."
    w = build_window(tok, 5, 5, text)
    labels = token_labels(text, w.context_offsets, [True, False, True, False])  # 4 words
    pieces = [tok._tokenizer.id_to_token(i) for i in w.ids]
    assert labels[:3] == [IGNORE] * 3 and labels[-1] == IGNORE  # [CLS], SLO tokens, [SEP]
    by_piece = dict(zip(pieces[3:-1], labels[3:-1], strict=True))
    assert by_piece["un"] == by_piece[","] == 1 and by_piece["token"] == 0 and by_piece["split"] == 1


def test_heads_round_trip_and_refuse_another_encoder(encoder: BertEncoder, tmp_path) -> None:
    a, b = DualHeadTLM(encoder), DualHeadTLM(encoder)
    path = save_heads(a, tmp_path / "h.safetensors", "enc:1", {"held_out_auc": 0.7})
    assert load_heads(b, path, "enc:1") == {"held_out_auc": 0.7}
    assert torch.equal(a.score_head.weight, b.score_head.weight) and torch.equal(a.m_head.bias, b.m_head.bias)
    with pytest.raises(ModelFileError):
        load_heads(b, path, "enc:2")


def test_labels_map_every_llm_token_to_one_word_and_keep_half(smollm) -> None:
    text = "The  quick brown fox,\njumps over the lazy dog's back; it's 42 degrees\n\nin Zürich today."
    words = split_words(text)
    assert len(words) % 2 == 0
    per_word = word_token_ids(smollm, text)
    assert len(per_word) == len(words) and all(per_word)
    # the concatenation is the text's own encoding: each LLM token is counted once, in exactly one word
    assert [t for ids in per_word for t in ids] == smollm.tokenizer.encode(text, add_bos=False, parse_special=False)
    labels = label_segment(smollm, Segment("k", "test", text))
    assert labels.num_llm_tokens == sum(len(ids) for ids in per_word)
    assert sum(labels.keep) == len(words) // 2
    kept = [s for s, k in zip(labels.word_scores, labels.keep, strict=True) if k]
    dropped = [s for s, k in zip(labels.word_scores, labels.keep, strict=True) if not k]
    assert min(kept) >= max(dropped)


def test_keep_top_breaks_ties_by_position() -> None:
    assert keep_top([1.0, 1.0, 1.0, 0.0], 0.5) == [True, True, False, False]
    assert keep_top([0.0, 2.0, 1.0], 0.5) == [False, True, False]


def test_roc_auc_on_a_hand_made_example() -> None:
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0.0, 1.0], [0, 1]) == 1.0
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5  # ties count half
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [1, 1])


def test_slo_and_bert_markers_in_a_context_are_text(tok, encoder):
    """Only the window's own prefix carries SLO tokens: a context that types "[pre02]" or "[SEP]" gets plain word
    pieces, so a request cannot forge its SLO or end its window."""
    base = encoder.config.vocab_size
    window = build_window(tok, 4, 7, "hello [pre02] [dec05] [SEP] world", "question")
    specials = [i for i in window.ids if i >= base or i in (tok.cls_id, tok.sep_id)]
    assert specials == [tok.cls_id, *window.ids[1:3], tok.sep_id]  # [CLS], the two real SLO tokens, [SEP]


def test_a_query_over_one_window_is_cut_for_the_tiny_lm_and_the_context_still_scored(tok: DualHeadTokenizer) -> None:
    query = "choice " * 700
    windows = build_windows(tok, 2, 5, "some context words", query)
    assert len(windows[0].ids) == MAX_TOKENS and all(s is None for s in windows[0].context_offsets)
    assert [s for w in windows for s in w.context_offsets if s is not None] == tok.encode("some context words")[1]


def test_the_served_pass_is_the_forward_and_close_to_it_in_bf16(encoder: BertEncoder, tok: DualHeadTokenizer) -> None:
    """serve() is the forward without autograd (keep scores of every window, the decision of the first); with
    serve_bf16 (CPUs whose LLM prefill runs bf16) its matmuls run in bf16 and its outputs stay within a few percent of
    their range."""
    model = DualHeadTLM(encoder).eval()
    ids, mask = _batch(tok)
    with torch.no_grad():
        keep, p_logits, m_logits = model(ids, mask)
    served = model.serve(ids, mask)
    assert torch.equal(served[0], keep[..., 1])
    # the decision branch runs on the first window alone, not in a batch of two: equal up to summation order
    assert torch.allclose(served[1], p_logits[0], atol=1e-5) and torch.allclose(served[2], m_logits[0], atol=1e-5)
    model.serve_bf16 = True
    fast = model.serve(ids, mask)
    assert all(t.dtype == torch.float32 for t in fast)
    for a, b in zip(fast, served, strict=True):
        assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()
