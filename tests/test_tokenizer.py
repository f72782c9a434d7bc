"""Tokenizer, special tokens and chat template, checked against llama.cpp and the GGUF's own template."""

from __future__ import annotations

import pytest

from llmaas.engine.detokenize import IncrementalDecoder

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
