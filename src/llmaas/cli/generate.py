"""`llmaas generate`: stream a reply to one prompt from the resident model (chat-formatted unless --raw)."""

from __future__ import annotations

import argparse
import sys

from llmaas.cli.common import add_model_options, load_from_args
from llmaas.engine.generate import Finished, GenerateRequest, Generator
from llmaas.engine.sampling import SamplingParams
from llmaas.errors import InvalidRequestError
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.transformer import DEFAULT_PREFILL_CHUNK_TOKENS
from llmaas.service.server import model_id

DEFAULT_CONTEXT_TOKENS = 2048  # the service's default maximum context (LLMS spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas generate", description=__doc__)
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="system message (chat mode; default: the template's own)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep, 1 = off (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable); the model's end-of-turn tokens always stop")
    p.add_argument("--ctx", type=int, default=None,
                   help=f"context limit in tokens, prompt + reply (default: {DEFAULT_CONTEXT_TOKENS} or the model's "
                        "own limit if smaller)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK_TOKENS,
                   help=f"prompt tokens per prefill step (default: {DEFAULT_PREFILL_CHUNK_TOKENS})")
    add_model_options(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    loaded = load_from_args(args)
    ctx = args.ctx if args.ctx is not None else min(DEFAULT_CONTEXT_TOKENS, loaded.config.context_length)
    if not 1 <= ctx <= loaded.config.context_length:
        raise InvalidRequestError(f"--ctx must be in 1..{loaded.config.context_length} for this model")
    if args.raw:
        ids = loaded.tokenizer.encode(text)
    else:
        if loaded.chat_template is None:
            raise InvalidRequestError("this model has no chat template; pass --raw to send the prompt as is")
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        messages.append({"role": "user", "content": text})
        ids = loaded.tokenizer.encode(loaded.chat_template.render(messages))
    request = GenerateRequest(tuple(ids), args.max_tokens, sampling, tuple(args.stop))
    cache = DenseKVCache(KVSpec.from_config(loaded.config), ctx)
    generator = Generator(loaded.model, loaded.tokenizer, args.prefill_chunk)
    for event in generator.stream(request, cache):
        if isinstance(event, Finished):
            t = event.timings
            print(f"\n[{model_id(loaded)}: loaded in {loaded.load_s:.2f} s; prompt {t.prompt_tokens} tokens in "
                  f"{t.prefill_s:.3f} s ({t.prefill_tok_s:.0f} tok/s); TTFT {t.ttft_s:.3f} s; "
                  f"{t.generated_tokens} tokens at {t.decode_tok_s:.1f} tok/s; finish: {event.finish_reason}]",
                  file=sys.stderr)
        else:
            print(event.text, end="", flush=True)
    return 0
