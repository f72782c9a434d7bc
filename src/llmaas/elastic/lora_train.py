"""LoRA recovery, one adapter per level, trained directly on the zero-copy sub-model of the reordered weights.

Owns the recipe (the scaled CPU default and the artifact's full recipe as an option), the loop (AdamW, linear
warm-up then linear decay, gradient accumulation, held-out evaluation keeping the best), checkpoints that make a
level resumable across sessions (the data order is a pure function of the seed and the step), and the training
record saved with each adapter. Uses any torch device (`--device cuda` on a lent GPU); never needs one.
Ignores where adapters are used (elastic/model.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from llmaas.elastic.artifact import ElasticArtifact, elastic_dir
from llmaas.elastic.dense_forward import DenseWeights, causal_lm_loss
from llmaas.elastic.lora_data import ALPACA_SOURCE, TEXT_SOURCE, Split, collate, make_split
from llmaas.elastic.lora_store import adapter_record, save_adapter
from llmaas.elastic.model_levels import model_level_name
from llmaas.elastic.reorder import reorder_
from llmaas.model.loader import LoadedModel
from llmaas.model.lora import ModelLora
from llmaas.model.widths import ModelWidths


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    micro_batch: int = 4
    accumulation: int = 2
    cutoff_tokens: int = 128
    lr: float = 2e-4
    warmup_steps: int = 10
    rank: int = 8
    alpha: float = 16.0
    eval_every: int = 25
    held_out: int = 32
    text_fraction: float = 0.5
    seed: int = 42
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "accumulation", "cutoff_tokens", "rank", "eval_every", "held_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.text_fraction <= 1:
            raise ValueError("--text-fraction must be in 0..1")


# ElastiLM's artifact recipe (2 epochs over alpaca-cleaned, global batch 64, cutoff 256, LR 1e-4, 100 warm-up
# steps, 2,000 held out, evaluated every 100 steps); for a GPU. On this 2,000-example sample 2 epochs are 60 steps.
FULL_RECIPE = TrainConfig(steps=60, micro_batch=4, accumulation=16, cutoff_tokens=256, lr=1e-4, warmup_steps=100,
                          eval_every=100, held_out=200, text_fraction=0.0)


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up to lr over warmup_steps, then linear decay to 0 at `steps` (step counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))


class LevelTrainer:
    def __init__(self, loaded: LoadedModel, widths: ModelWidths, split: Split, config: TrainConfig,
                 checkpoint: Path) -> None:
        self.loaded, self.widths, self.split, self.config, self.checkpoint = loaded, widths, split, config, checkpoint
        device = torch.device(config.device)
        self.weights = DenseWeights.expanded(loaded.config, loaded.model.weights).to(device)
        self.lora = ModelLora.init(loaded.config, widths, config.rank, config.alpha,
                                   torch.Generator().manual_seed(config.seed)).to(device)
        self.params = list(self.lora.tensors().values())
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.step, self.tokens_seen, self.wall_s = 0, 0, 0.0
        self.best_loss, self.best_step, self.base_loss = math.inf, 0, math.nan
        self.best = {k: v.detach().clone() for k, v in self.lora.tensors().items()}
        self.history: list[dict] = []
        if checkpoint.exists():
            self._resume()

    def _loss(self, examples, with_lora: bool = True) -> torch.Tensor:
        ids, mask = collate(examples, self.loaded.tokenizer.special.eos_id or 0)
        device = torch.device(self.config.device)
        return causal_lm_loss(self.loaded.model, self.weights, ids.to(device), mask.to(device), widths=self.widths,
                              lora=self.lora if with_lora else None)

    @torch.no_grad()
    def evaluate(self, with_lora: bool = True) -> float:
        """Mean held-out loss (per batch of micro_batch examples, averaged)."""
        held, mb = self.split.held_out, self.config.micro_batch
        losses = [self._loss(held[i:i + mb], with_lora).item() for i in range(0, len(held), mb)]
        return sum(losses) / len(losses)

    def train(self, log=print, until_step: int | None = None) -> ModelLora:
        """Train to the recipe's last step, or pause at until_step (checkpointed; a later run resumes the same
        schedule), and return the best adapter so far."""
        c = self.config
        stop = min(c.steps, until_step) if until_step is not None else c.steps
        if math.isnan(self.base_loss):
            self.base_loss = self.evaluate(with_lora=False)
            log(f"  held-out loss without LoRA {self.base_loss:.4f} (ppl {math.exp(self.base_loss):.2f})")
        train, per_step = self.split.train, c.micro_batch * c.accumulation
        while self.step < stop:
            t0 = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(c, self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for k in range(c.accumulation):
                start = (self.step * per_step + k * c.micro_batch) % len(train)
                batch = [train[(start + j) % len(train)] for j in range(c.micro_batch)]
                loss = self._loss(batch) / c.accumulation
                loss.backward()
                loss_sum += loss.item()
                self.tokens_seen += sum(len(e.ids) for e in batch)
            self.optimizer.step()
            self.step += 1
            self.wall_s += time.perf_counter() - t0
            self.history.append({"step": self.step, "train_loss": loss_sum})
            if self.step % c.eval_every == 0 or self.step == stop:
                t1 = time.perf_counter()
                held = self.evaluate()
                self.wall_s += time.perf_counter() - t1
                self.history[-1]["held_out_loss"] = held
                if held < self.best_loss:
                    self.best_loss, self.best_step = held, self.step
                    self.best = {k: v.detach().clone() for k, v in self.lora.tensors().items()}
                eta = self.wall_s / self.step * (c.steps - self.step)
                log(f"  step {self.step}/{c.steps}: train {loss_sum:.4f}, held-out {held:.4f} "
                    f"(best {self.best_loss:.4f} @ {self.best_step}), {self.wall_s:.0f} s, ETA {eta:.0f} s")
                self._save_checkpoint()
            elif self.step % 5 == 0:
                eta = self.wall_s / self.step * (c.steps - self.step)
                log(f"  step {self.step}/{c.steps}: train {loss_sum:.4f}, {self.wall_s:.0f} s, ETA {eta:.0f} s")
        return ModelLora.from_tensors({k: v.cpu() for k, v in self.best.items()}, self.widths, self.lora.scale)

    def record(self) -> dict:
        return {"recipe": asdict(self.config), "steps": self.step, "complete": self.step >= self.config.steps,
                "tokens_seen": self.tokens_seen,
                "wall_s": round(self.wall_s, 1), "data": {"alpaca": ALPACA_SOURCE, "text": TEXT_SOURCE,
                                                            "train_examples": len(self.split.train),
                                                            "held_out_examples": len(self.split.held_out)},
                "held_out_loss_without_lora": self.base_loss, "held_out_loss_best": self.best_loss,
                "best_step": self.best_step, "history": self.history}

    def _save_checkpoint(self) -> None:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "wall_s": self.wall_s,
                 "best_loss": self.best_loss, "best_step": self.best_step, "base_loss": self.base_loss,
                 "lora": {k: v.detach().cpu() for k, v in self.lora.tensors().items()},
                 "best": {k: v.cpu() for k, v in self.best.items()}, "optimizer": self.optimizer.state_dict(),
                 "history": self.history, "config": _resume_key(self.config)}
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint)

    def _resume(self) -> None:
        state = torch.load(self.checkpoint, weights_only=True)
        if state["config"] != _resume_key(self.config):
            raise ValueError(f"{self.checkpoint} was made with another recipe; delete it or use the same options")
        with torch.no_grad():
            for k, v in self.lora.tensors().items():
                v.copy_(state["lora"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen, self.wall_s = state["step"], state["tokens_seen"], state["wall_s"]
        self.best_loss, self.best_step, self.base_loss = state["best_loss"], state["best_step"], state["base_loss"]
        self.best = {k: v.to(self.config.device) for k, v in state["best"].items()}
        self.history = state["history"]


def _resume_key(config: TrainConfig) -> dict:
    """What a checkpoint must share with the run that resumes it: everything but the step target and device."""
    return {k: v for k, v in asdict(config).items() if k not in ("steps", "device")}


def train_levels(loaded: LoadedModel, artifact: ElasticArtifact, directory: Path, levels: list[int],
                 config: TrainConfig, until_step: int | None = None, log=print) -> None:
    """Train (or resume, or skip when done) each level's adapter on the reordered model `loaded`."""
    split = make_split(loaded.tokenizer, config.cutoff_tokens, config.text_fraction, config.held_out, config.seed)
    log(f"data: {len(split.train)} training / {len(split.held_out)} held-out examples ({ALPACA_SOURCE} + "
        f"{TEXT_SOURCE}, text fraction {config.text_fraction})")
    for m in levels:
        done = adapter_record(directory, m)
        target = min(config.steps, until_step or config.steps)
        if done is not None and done["steps"] >= target and _resume_key(TrainConfig(**done["recipe"])) == \
                _resume_key(config):
            log(f"level {model_level_name(m)}: adapter done ({done['steps']} steps), skipped")
            continue
        checkpoint = directory / "lora" / f"checkpoint_{model_level_name(m)}.pt"
        log(f"level {model_level_name(m)}: training to step {target} of {config.steps} (checkpoint {checkpoint})")
        trainer = LevelTrainer(loaded, artifact.levels[m], split, config, checkpoint)
        lora = trainer.train(log, until_step)
        path = save_adapter(directory, m, lora, trainer.record())
        log(f"level {model_level_name(m)}: saved {path} ({lora.num_params / 1e6:.2f} M parameters, "
            f"{lora.nbytes / 2**20:.1f} MiB; held-out loss {trainer.base_loss:.4f} -> {trainer.best_loss:.4f})")


RECIPES = ("scaled", "full")


def recipe(name: str, device: str = "cpu", steps: int | None = None) -> TrainConfig:
    """A named recipe (scaled: the CPU default; full: ElastiLM's artifact recipe, for a GPU) on a device, with its
    step count optionally overridden."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}; got {name!r}")
    config = FULL_RECIPE if name == "full" else TrainConfig()
    return replace(config, device=device, **({"steps": steps} if steps else {}))


def train_artifact_levels(loaded: LoadedModel, levels: list[int], config: TrainConfig, until_step: int | None = None,
                          directory: Path | None = None) -> None:
    """Train (or resume) the adapters of `levels` on the model's elastic artifact (default: its cache directory)."""
    directory = directory or elastic_dir(loaded.model_id)
    artifact = ElasticArtifact.load(directory, loaded.model_id)
    reorder_(loaded.config, loaded.model.weights, artifact.orders)
    loaded.model.weights_changed()
    train_levels(loaded, artifact, directory, levels, config, until_step)

