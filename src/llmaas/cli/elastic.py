"""`llmaas elastic prepare|build|train|profile|score-head`: the offline steps of ElastiLM, each cached per model under
`$LLMAAS_CACHE/elastic/<model>/` (default ~/.cache/llmaas) and rebuilt by the same command. `prepare` runs them all
(what `llmaas serve --elastic` needs); the others run one step."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmaas.cli.common import add_model_options, load_from_args, positive_int
from llmaas.engine.cpu_governor import apply_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmaas elastic", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    from llmaas.elastic.latency import LatencyConfig
    from llmaas.elastic.prepare import RECIPES as PREPARE_RECIPES
    prepare = sub.add_parser("prepare", help="every artifact elastic requests need: reordering, LoRA adapters, "
                                             "latency table, tiny-LM score and decision heads (resumable)")
    add_model_options(prepare)
    prepare.add_argument("--recipe", choices=sorted(PREPARE_RECIPES), default="fast",
                         help="fast: within 45 min on 2 cores (default); quality: slower, better heads and adapters")
    prepare.add_argument("--questions", type=positive_int,
                         help="decision-head label questions (default: the recipe's; each costs 90 scored configs)")
    prepare.add_argument("--elastic-dir", type=Path, help="artifact directory (default: the model's cache dir)")
    build = sub.add_parser("build", help="anchor layers, Taylor importance, unit orders and the level table")
    add_model_options(build)
    build.add_argument("--refresh", action="store_true",
                       help="rebuild an existing artifact (deletes the LoRA adapters trained on its unit orders)")
    train = sub.add_parser("train", help="LoRA recovery per level (scaled CPU recipe by default; resumable)")
    add_model_options(train)
    from llmaas.elastic.lora_train import RECIPES, TrainConfig
    from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
    train.add_argument("--levels", default=",".join(model_level_name(m) for m in MODEL_LEVELS[:-1]),
                       help="comma-separated levels to train (default: every level below 1.0)")
    train.add_argument("--recipe", choices=RECIPES, default="scaled",
                       help="scaled: the CPU recipe (default); full: ElastiLM's artifact recipe, for a GPU")
    train.add_argument("--steps", type=positive_int,
                       help=f"optimizer steps per level (scaled default {TrainConfig().steps})")
    train.add_argument("--until-step", type=positive_int, metavar="N",
                       help="pause every level at step N of its schedule (checkpointed; rerun to go on)")
    train.add_argument("--device", default="cpu", help="torch device, e.g. cuda on a lent GPU (default cpu)")
    train.add_argument("--elastic-dir", type=Path, help="artifact directory (default: the model's cache dir)")
    profile = sub.add_parser("profile", help="measure TTFT and TPOT per (level, prompt length)")
    add_model_options(profile)
    profile.add_argument("--runs", type=positive_int, default=LatencyConfig.runs,
                         help=f"timed runs per point, after one warm-up (default {LatencyConfig.runs})")
    profile.add_argument("--elastic-dir", type=Path, help="artifact directory (default: the model's cache dir)")
    profile.add_argument("--json", type=Path, help="also write the table here")
    from llmaas.elastic.score_train import ScoreTrainConfig
    score = sub.add_parser("score-head", help="the dual-head TLM's score head: LLM self-information labels "
                                              "(cached, resumable), training, held-out ROC AUC")
    add_model_options(score)
    score.add_argument("--segments", type=positive_int, default=2000,
                       help="training segments of <= 256 encoder tokens, 10%% held out (default 2000)")
    score.add_argument("--epochs", type=positive_int, default=ScoreTrainConfig.epochs,
                       help=f"at most this many epochs (default {ScoreTrainConfig.epochs})")
    score.add_argument("--budget-s", type=float, default=ScoreTrainConfig.budget_s,
                       help=f"wall-time cap on training, seconds (default {ScoreTrainConfig.budget_s:.0f})")
    score.add_argument("--elastic-dir", type=Path, help="where labels and heads go (default: the model's cache dir)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from llmaas.elastic.artifact import elastic_dir
    if args.step == "prepare":
        from dataclasses import replace

        from llmaas.elastic.prepare import RECIPES, prepare
        recipe = RECIPES[args.recipe]
        if args.questions:
            recipe = replace(recipe, decision=replace(recipe.decision, questions=args.questions))
        apply_threads(args.threads)
        prepare(recipe, args.model, args.elastic_dir, not args.no_kernels)
        return 0
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
        from llmaas.elastic.lora_train import recipe, train_artifact_levels
        from llmaas.elastic.model_levels import parse_model_level
        levels = [parse_model_level(x) for x in args.levels.split(",") if x.strip()]
        config = recipe(args.recipe, args.device, args.steps)
        train_artifact_levels(load_from_args(args), levels, config, args.until_step, args.elastic_dir)
        return 0
    if args.step == "score-head":
        return _score_head(args)
    from llmaas.elastic.latency import LatencyConfig, write_profile
    from llmaas.elastic.model import ElasticModel
    apply_threads(args.threads)
    elastic = ElasticModel.open(args.model, args.elastic_dir, use_kernels=not args.no_kernels)
    write_profile(elastic, LatencyConfig(runs=args.runs), args.json)
    return 0


def _score_head(args: argparse.Namespace) -> int:
    import time

    from llmaas.elastic.artifact import elastic_dir
    from llmaas.elastic.score_train import ScoreTrainConfig, build_score_head
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    loaded = load_from_args(args)
    directory = args.elastic_dir or elastic_dir(loaded.model_id)
    config = ScoreTrainConfig(epochs=args.epochs, budget_s=args.budget_s)
    r = build_score_head(loaded, directory, args.segments, config, log)
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in r["stages_s"].items())
    print(f"held-out ROC AUC {r['held_out_auc']:.4f} (random head {r['held_out_auc_init']:.4f}) on "
          f"{r['held_out_segments']} segments; trained on {r['train_segments']} for {r['epochs_done']:.2f} epochs "
          f"({r['steps']} steps, {r['threads']} threads)")
    print(f"label balance: {r['word_keep_fraction']:.3f} of {r['words']} words keep, "
          f"{r['token_keep_fraction']:.3f} of {r['encoder_tokens']} encoder tokens keep")
    print(f"wall time: {stages}; total {time.perf_counter() - started:.1f} s")
    return 0
