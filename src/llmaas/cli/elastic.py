"""`llmaas elastic build|train|profile`: the offline steps of ElastiLM's model side, each cached per model under
`$LLMAAS_CACHE/elastic/<model>/` (default ~/.cache/llmaas) and rebuilt by the same command."""

from __future__ import annotations

import argparse

from llmaas.cli.common import add_model_options, load_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmaas elastic", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    build = sub.add_parser("build", help="anchor layers, Taylor importance, unit orders and the level table")
    add_model_options(build)
    build.add_argument("--refresh", action="store_true",
                       help="rebuild an existing artifact (deletes the LoRA adapters trained on its unit orders)")
    train = sub.add_parser("train", help="LoRA recovery per level (scaled CPU recipe by default; resumable)")
    add_model_options(train)
    from llmaas.elastic.lora_train import add_train_options
    add_train_options(train)
    profile = sub.add_parser("profile", help="measure TTFT and TPOT per (level, prompt length)")
    add_model_options(profile)
    from llmaas.elastic.latency import add_profile_options
    add_profile_options(profile)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from llmaas.elastic.artifact import elastic_dir
    if args.step == "build":
        import shutil

        from llmaas.elastic.artifact import ARTIFACT_FILE
        from llmaas.elastic.build import build_artifact
        loaded = load_from_args(args)
        directory = elastic_dir(loaded.model_id)
        if (directory / ARTIFACT_FILE).exists():
            if not args.refresh:
                print(f"{directory / ARTIFACT_FILE} exists; `llmaas elastic build --refresh` rebuilds it")
                return 0
            shutil.rmtree(directory / "lora", ignore_errors=True)  # adapters are tied to the old unit orders
        build_artifact(loaded, directory)
        return 0
    if args.step == "train":
        from llmaas.elastic.lora_train import run_training
        return run_training(args)
    from llmaas.elastic.latency import run_profile
    return run_profile(args)
