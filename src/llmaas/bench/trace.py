"""Synthetic multi-app context-switching traces, as the LLMS paper draws them: `llmaas bench trace make`.

Owns what a trace is and how one is drawn. Contexts are bound round-robin to the six task types (one app each) and
keep their task. Each call is one dataset entry whose delta length (the user turn's tokens plus the output cap) lies
in its task's range. Calls arrive as a Poisson process. The context of each call is chosen by the pattern:
- random: uniform;
- markov: depth d of the recency stack with probability ∝ θ^d;
- gaussian: ∝ exp(−(μ_j − mean μ)² / 2 std(μ)²) over the tasks' mean delta lengths.

A trace is a deterministic function of its config: the seed, pattern, contexts, rate, duration and calls. It is
saved as JSONL, a header line and then one line per call, and carries each call's text and gold answer, so a replay
needs no data set. Entries too short for their range are lengthened the way such apps would be: AG News with labelled
examples (few-shot, from its train sample), WMT17 with the next sentences of the same test set. Longer ones are cut
at the range's top. Ignores replay (llmaas.bench.switch).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llmaas.bench.kv_tasks import TASKS, Task
from llmaas.engine.conversation import Conversation
from llmaas.errors import InvalidRequestError
from llmaas.paths import SHARED_DATA_DIR
from llmaas.shared_data import read_jsonl

# Spec §9, Table 3 (paper): tokens a call adds to its context, in the paper's task order.
DELTA_RANGES: dict[str, tuple[int, int]] = {
    "ag_news": (200, 500),
    "xsum": (1000, 2000),
    "samsum": (100, 300),
    "cnn_dailymail": (500, 1000),
    "wmt17_de_en": (100, 500),
    "sst2": (10, 100),
}
PATTERNS = ("random", "markov", "gaussian")
HEADER_KIND = "llmaas-trace"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TraceConfig:
    pattern: str = "markov"
    contexts: int = 8
    seed: int = 42
    mean_gap_s: float = 300.0  # one call per 5 minutes
    duration_s: float = 72 * 3600.0
    max_calls: int | None = None  # stop earlier (quick runs); counts measured calls, after the warm-up
    markov_theta: float = 0.5
    # Calls at the start that bring every context to a steady state (history, KV, a full budget) and are not
    # measured: round-robin over all contexts, each round in a seeded order, whatever the pattern (after the paper's
    # 72 hours every app has its history). A short trace from empty contexts often never put the budget under
    # pressure, and neither did a warm-up drawn by the Markov pattern, which called 4 of 8 contexts (seed 42).
    warmup_calls: int = 0

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise InvalidRequestError(f"pattern must be one of {PATTERNS}; got {self.pattern!r}")
        if self.contexts < 1 or self.mean_gap_s <= 0 or self.duration_s <= 0:
            raise InvalidRequestError("contexts >= 1, mean_gap_s > 0 and duration_s > 0 are required")
        if self.max_calls is not None and self.max_calls < 1:
            raise InvalidRequestError("max_calls must be >= 1")
        if self.warmup_calls < 0:
            raise InvalidRequestError("warmup_calls must be >= 0")
        if not 0 < self.markov_theta < 1:
            raise InvalidRequestError("markov_theta must lie in (0, 1)")


@dataclass(frozen=True)
class TraceCall:
    index: int
    time_s: float  # virtual arrival time
    gap_s: float  # virtual time since the previous call (the first: since the trace start)
    context: str  # "c03-xsum"
    task: str
    entry_id: str
    user: str  # the user turn's text
    gold: str
    max_new_tokens: int
    delta_tokens: int  # the user turn's tokens (as the first turn of a context) plus max_new_tokens
    depth: int  # the context's depth in the recency stack before this call (-1: never called)
    warmup: bool = False  # part of the unmeasured warm-up (TraceConfig.warmup_calls)


@dataclass(frozen=True)
class Trace:
    config: TraceConfig
    calls: tuple[TraceCall, ...]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"kind": HEADER_KIND, "format_version": FORMAT_VERSION, "config": asdict(self.config)}
        lines = [json.dumps(header)] + [json.dumps(asdict(c), ensure_ascii=False) for c in self.calls]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Trace:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("kind") != HEADER_KIND or header.get("format_version") != FORMAT_VERSION:
            raise InvalidRequestError(f"{path} is not an llmaas trace (format {FORMAT_VERSION}); make one with "
                                      "`llmaas bench trace make`")
        return cls(TraceConfig(**header["config"]), tuple(TraceCall(**json.loads(x)) for x in lines[1:] if x))


def task_of(context_index: int) -> str:
    return list(DELTA_RANGES)[context_index % len(DELTA_RANGES)]


def context_name(context_index: int) -> str:
    return f"c{context_index:02d}-{task_of(context_index)}"


def make_trace(config: TraceConfig, conversation: Conversation, data_dir: Path = SHARED_DATA_DIR) -> Trace:
    rng = random.Random(config.seed)
    names = [context_name(j) for j in range(config.contexts)]
    times, t = [], 0.0
    cap = None if config.max_calls is None else config.warmup_calls + config.max_calls
    while True:
        t += rng.expovariate(1 / config.mean_gap_s)
        if t > config.duration_s or (cap is not None and len(times) == cap):
            break
        times.append(t)
    pools = {task: _pool(config.seed, task, conversation, data_dir) for task in {task_of(j)
                                                                            for j in range(config.contexts)}}
    taken = dict.fromkeys(pools, 0)
    means = [sum(DELTA_RANGES[task_of(j)]) / 2 for j in range(config.contexts)]
    mu = sum(means) / len(means)
    sd = math.sqrt(sum((m - mu) ** 2 for m in means) / len(means))
    gauss = [math.exp(-((m - mu) ** 2) / (2 * sd * sd)) if sd > 0 else 1.0 for m in means]
    stack: list[int] = []  # most recent first
    calls, previous = [], 0.0
    rounds: list[int] = []  # the warm-up's current round, still to call
    for i, t in enumerate(times):
        if i < config.warmup_calls:
            if not rounds:
                rounds = rng.sample(range(config.contexts), config.contexts)
            j = rounds.pop()
        elif config.pattern == "random":
            j = rng.randrange(config.contexts)
        elif config.pattern == "gaussian":
            j = rng.choices(range(config.contexts), weights=gauss)[0]
        else:  # markov over the recency stack; contexts never called sit below it in index order
            order = stack + [k for k in range(config.contexts) if k not in stack]
            d = rng.choices(range(len(order)), weights=[config.markov_theta ** d for d in range(len(order))])[0]
            j = order[d]
        depth = stack.index(j) if j in stack else -1
        stack = [j] + [k for k in stack if k != j]
        task = task_of(j)
        entry_id, user, gold, delta = pools[task].get(taken[task])
        taken[task] += 1
        calls.append(TraceCall(i, t, t - previous, names[j], task, entry_id, user, gold, TASKS[task].max_new_tokens,
                               delta, depth, i < config.warmup_calls))
        previous = t
    return Trace(config, tuple(calls))


class _Pool:
    """The entries of one task in drawing order, produced once and shared by every trace of a run that uses the same
    seed (each trace starts at the first, so a trace does not depend on which others were made before it)."""

    def __init__(self, entries: Iterator[tuple[str, str, str, int]]) -> None:
        self.entries, self.made = entries, []

    def get(self, i: int) -> tuple[str, str, str, int]:
        while len(self.made) <= i:
            self.made.append(next(self.entries))
        return self.made[i]


_POOLS: dict[tuple, _Pool] = {}


def _pool(seed: int, task: str, conversation: Conversation, data_dir: Path) -> _Pool:
    key = (seed, task, id(conversation.tokenizer), str(data_dir))
    if key not in _POOLS:
        _POOLS[key] = _Pool(_entries(TASKS[task], conversation, data_dir, random.Random(f"{seed}/{task}")))
    return _POOLS[key]


def _entries(task: Task, conversation: Conversation, data_dir: Path,
             rng: random.Random) -> Iterator[tuple[str, str, str, int]]:
    """Endless (id, user text, gold, delta tokens) of this task in its delta range, rows in rng-shuffled order
    (reshuffled when used up: a long trace reuses entries)."""
    rows = _rows(data_dir / task.path, task)
    lo, hi = DELTA_RANGES[task.name]
    demos = _rows(data_dir / "ag_news" / "train_sample.jsonl", task) if task.name == "ag_news" else []
    tokenizer = conversation.tokenizer

    def delta(user: str) -> int:
        return len(conversation.prompt_ids([], user, starts_context=True)) + task.max_new_tokens

    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        produced = False
        for n, k in enumerate(order):
            row = rows[k]
            text, gold, entry_id = str(row[task.text_field]), str(row[task.gold_field]), str(row["id"])
            user = _user_turn(task, text)
            if delta(user) < lo and task.name == "ag_news":  # few-shot: labelled articles until the range is met
                want = rng.randint(lo, hi)
                shots: list[str] = []
                for d in rng.sample(demos, len(demos)):
                    shots.append(f"Article: {d['text']}\nTopic: {d['label_name']}")
                    longer = _user_turn(task, text, shots)
                    if delta(longer) > hi:
                        break
                    user = longer
                    if delta(user) >= want:
                        break
            elif delta(user) < lo and task.name == "wmt17_de_en":  # a passage: the next sentences of the test set
                sources, targets = [text], [gold]
                for nxt in rows[k + 1:]:
                    longer = _user_turn(task, " ".join([*sources, str(nxt[task.text_field])]))
                    if delta(longer) > hi:
                        break
                    sources.append(str(nxt[task.text_field]))
                    targets.append(str(nxt[task.gold_field]))
                    user = longer
                    if delta(user) >= lo:
                        break
                gold, entry_id = " ".join(targets), f"{entry_id}+{len(sources) - 1}"
            if delta(user) > hi:  # cut the document so the call fits its range
                doc = tokenizer.encode(text, add_bos=False, parse_special=False)
                over = delta(user) - hi
                user = _user_turn(task, tokenizer.decode(doc[:max(1, len(doc) - over - 2)]))
            d = delta(user)
            if lo <= d <= hi:
                produced = True
                yield entry_id, user, gold, d
            elif n > 200 and not produced:
                raise InvalidRequestError(f"no entry of {task.name} fits its delta range {lo}..{hi} tokens")
        if not produced:
            raise InvalidRequestError(f"no entry of {task.name} fits its delta range {lo}..{hi} tokens")


def _user_turn(task: Task, text: str, shots: list[str] | None = None) -> str:
    if shots:
        examples = "\n\n".join(shots)
        return f"Here are news articles and their topics:\n\n{examples}\n\n{task.context.format(text=text)}\n\n" \
               f"{task.question}"
    return f"{task.context.format(text=text)}\n\n{task.question}"


def _rows(path: Path, task: Task) -> list[dict]:
    return [r for r in read_jsonl(path) if str(r.get(task.text_field, "")).strip()]


# -- CLI ------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas bench trace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, title="actions")
    make = sub.add_parser("make", help="draw one trace and write it as JSONL",
                          description="Draw one trace (a deterministic function of these options) and write it as "
                                      "JSONL: a header line, then one line per call with its text and gold answer.")
    make.add_argument("--pattern", choices=PATTERNS, default="markov", help="context switching (default: markov)")
    make.add_argument("--contexts", type=int, default=8, help="active contexts (default: 8)")
    make.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    make.add_argument("--mean-gap-s", type=float, default=300.0, help="mean virtual gap between calls (default: 300)")
    make.add_argument("--hours", type=float, default=72.0, help="virtual length (default: 72)")
    make.add_argument("--max-calls", type=int, help="stop after this many calls (default: no limit)")
    make.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from llmaas.model.loader import load_model

    loaded = load_model()
    config = TraceConfig(args.pattern, args.contexts, args.seed, args.mean_gap_s, args.hours * 3600, args.max_calls)
    trace = make_trace(config, Conversation(loaded.tokenizer, loaded.chat_template))
    trace.save(args.out)
    gaps = [c.gap_s for c in trace.calls]
    print(f"wrote {args.out}: {len(trace.calls)} calls over {config.contexts} contexts ({config.pattern}), mean gap "
          f"{sum(gaps) / max(1, len(gaps)):.0f} s, delta tokens {min(c.delta_tokens for c in trace.calls)}.."
          f"{max(c.delta_tokens for c in trace.calls)}")
    return 0
