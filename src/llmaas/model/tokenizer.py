"""The tokenizer and special tokens a GGUF describes, rebuilt with HF `tokenizers` from the file's metadata.

Owns: the GPT-2-style byte-level BPE (`tokenizer.ggml.model == "gpt2"`, with llama.cpp's pre-tokenizer regexes per
`tokenizer.ggml.pre`) and SentencePiece-style BPE (`"llama"`, merges derived from the scores the way llama.cpp ranks
them); control tokens; BOS handling; which tokens end a generation. Ignores: chat formatting (chat_template.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llmaas.errors import UnsupportedModelError
from llmaas.model.gguf_file import GGUFFile

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer splits (llama-vocab.cpp), applied in order before byte-level BPE.
_PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    **{name: (r"\p{N}", _GPT2) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                                             "minerva")},
}
# Token texts that end a turn in common chat formats; llama.cpp treats these control tokens as end-of-generation too.
_END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "</s>",
})
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    stop_ids: frozenset[int]  # generation ends on any of these


class Tokenizer:
    def __init__(self, hf: HFTokenizer, special: SpecialTokens) -> None:
        # No Python list of the vocabulary: `hf` holds it (a list of 49,152 strings held 6 MB, measured).
        self._hf = hf
        self.special = special

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Tokenizer:
        kind = f.get("tokenizer.ggml.model")
        tokens: list[str] = f.get("tokenizer.ggml.tokens")
        types: list[int] = f.get("tokenizer.ggml.token_type", [1] * len(tokens))
        if kind == "gpt2":
            hf = _byte_level_bpe(tokens, f.get("tokenizer.ggml.merges", []), f.get("tokenizer.ggml.pre", "default"))
            add_bos_default = False
        elif kind == "llama":
            hf = _sentencepiece_bpe(tokens, f.get("tokenizer.ggml.scores"), types,
                                    f.get("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True
        else:
            raise UnsupportedModelError(f"tokenizer model {kind!r} is not supported (only gpt2 and llama)")
        specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True)
                    if ty in (_CONTROL, _USER_DEFINED)]
        hf.add_special_tokens(specials)

        def token_id(key: str) -> int | None:
            value = f.get(key, None)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        eos = token_id("tokenizer.ggml.eos_token_id")
        stops = {i for i in (eos, token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id"))
                 if i is not None}
        stops |= {i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == _CONTROL and t in
                  _END_OF_GENERATION_TEXTS}
        special = SpecialTokens(token_id("tokenizer.ggml.bos_token_id"), eos,
                                bool(f.get("tokenizer.ggml.add_bos_token", add_bos_default)), frozenset(stops))
        return cls(hf, special)

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of text. Control-token texts (e.g. <|im_start|>) become their ids when parse_special is set;
        BOS is prepended when the model asks for it (or as add_bos says)."""
        self._hf.encode_special_tokens = not parse_special
        ids = self._hf.encode(text, add_special_tokens=False).ids
        add = self.special.add_bos if add_bos is None else add_bos
        if add and self.special.bos_id is not None:
            ids = [self.special.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        text = self._hf.id_to_token(token_id)
        if text is None:
            raise UnsupportedModelError(f"token id {token_id} has no text in this vocabulary "
                                        f"({self._hf.get_vocab_size()} tokens)")
        return text


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    regexes = _PRE_TOKENIZER_REGEXES.get(pre)
    if regexes is None:
        print(f"llmaas: unknown pre-tokenizer {pre!r}; using GPT-2's, as llama.cpp does", file=sys.stderr)
        regexes = _PRE_TOKENIZER_REGEXES["default"]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool
                       ) -> HFTokenizer:
    """SentencePiece BPE: merge pairs ranked by the merged piece's score (llama.cpp's llm_tokenizer_spm)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == 2), None)  # token_type 2 = unknown
    hf = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                                byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return hf
