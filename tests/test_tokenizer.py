"""Tokenizer, special tokens and chat template, checked against llama.cpp and the GGUF's own template."""

from __future__ import annotations

import pytest

from llmaas.engine.detokenize import IncrementalDecoder
from llmaas.errors import UnsupportedModelError
from llmaas.model.loader import load_model
from tiny_gguf import spm_vocab, write_tiny_llama

ROUND_TRIP = ["plain ascii", "  two leading spaces and a trailing one ", "tabs\tand\nnewlines\r\n", "12345 67.89",
              "naïve café 日本語 🤖🧠", "<|im_start|> looks special", "", "\n\n\n"]


def test_token_ids_equal_llama_cpp(smollm, reference):
    for case in reference["llama_cpp_tokenizations"]:
        assert smollm.tokenizer.encode(case["text"]) == case["ids"], case["text"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(smollm, text):
    assert smollm.tokenizer.decode(smollm.tokenizer.encode(text)) == text


def test_control_tokens_parse_only_when_asked(smollm):
    tok = smollm.tokenizer
    assert tok.encode("<|im_start|>") == [1]
    assert 1 not in tok.encode("<|im_start|>", parse_special=False)
    assert tok.decode(tok.encode("<|im_start|>", parse_special=False)) == "<|im_start|>"


def test_special_and_stop_tokens(smollm):
    s = smollm.tokenizer.special
    assert (s.bos_id, s.eos_id, s.add_bos) == (1, 2, False)
    assert s.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>


def test_chat_template_renders_the_gguf_template(smollm):
    rendered = smollm.chat_template.render([{"role": "user", "content": "Hi"}])
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own_system = smollm.chat_template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}], add_generation_prompt=False)
    assert own_system == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                          "<|im_start|>assistant\nHello.<|im_end|>\n")


def test_chat_template_rejects_bad_messages(smollm):
    from llmaas.errors import InvalidRequestError

    for bad in ([{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}], ["hi"]):
        with pytest.raises(InvalidRequestError):
            smollm.chat_template.render(bad)


def test_incremental_decoding_never_splits_characters(smollm):
    text = "Emoji 🤖🧠 and CJK 日本語 mixed with ascii."
    ids = smollm.tokenizer.encode(text)
    decoder = IncrementalDecoder(smollm.tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_sentencepiece_vocabularies(tmp_path):
    """llama-style (SentencePiece BPE) GGUFs: merges in score order, a space prefix, byte fallback, BOS added.
    (Checked against llama.cpp on Gemma 3's 262k-token vocabulary as well: 13 of 13 awkward strings identical.)"""
    loaded = load_model(write_tiny_llama(tmp_path / "spm.gguf", sentencepiece=True), use_kernels=False)
    tok, ids = loaded.tokenizer, {t: i for i, t in enumerate(spm_vocab()[0])}
    assert tok.encode("hello world") == [1, ids["▁hello"], ids["▁world"]]
    assert tok.encode("hello é", add_bos=False) == [ids["▁hello"], ids["▁"], ids["<0xC3>"], ids["<0xA9>"]]
    for text in ("hello world", "hello é", "held words", "  two spaces"):
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.special.stop_ids == {2} and loaded.chat_template is None


def test_token_text_is_the_gguf_vocabulary_for_every_id(smollm, tmp_path):
    """The tokenizer keeps no Python copy of the vocabulary; every id's text still comes back as the GGUF lists it
    (byte-level BPE and SentencePiece BPE)."""
    from llmaas.model.gguf_file import GGUFFile

    spm = load_model(write_tiny_llama(tmp_path / "spm.gguf", sentencepiece=True), use_kernels=False)
    for loaded in (smollm, spm):
        tokens = GGUFFile(loaded.path).get("tokenizer.ggml.tokens")
        assert [loaded.tokenizer.token_text(i) for i in range(len(tokens))] == tokens
    with pytest.raises(UnsupportedModelError, match="no text"):
        smollm.tokenizer.token_text(len(GGUFFile(smollm.path).get("tokenizer.ggml.tokens")) + 10)
