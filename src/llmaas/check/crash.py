"""The crash campaign: a multi-app conversation replay while the harness `kill -9`s the service at random moments.

Owns the replay and the judgement after each restart. Three apps hold two contexts each; every context follows a
fixed list of prompts, greedy with short replies, on `serve --kv-policy llms-lossless` (exact KV, so a restored
context must continue exactly). A round: start the service on the same data directory, check every context's stored
history (history.py), make one verification call on every context (it must be callable and its reply must equal that
of an uninterrupted twin service fed the same turns), then replay plain and streamed calls on random contexts and
SIGKILL the service a random delay after a random call starts (prefill, decode, commit or write-back). The twin is a
second service on its own directory, extended lazily so it always holds one turn more than any compared context.
The KV budget holds two contexts, so eviction, write-back and restore from disk are exercised too; the contexts are
short (384 tokens), so they pass their limit every few turns and slide their attention-sink window (re-prefill, new
token ids, deletion of the dropped chunks on disk) inside the crash window as well. Ignores sampling (greedy only),
other policies, and the OpenAI routes (fuzz and isolation cover them).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from llmaas.check.harness import Progress, ServiceUnderTest
from llmaas.check.history import check_history
from llmaas.client import CallReply, Client, ServiceError

APPS = ["crash-a", "crash-b", "crash-c"]
CONTEXTS_PER_APP = 2
MAX_TOKENS = 8
MAX_CONTEXT_TOKENS = 384  # ~35 tokens a turn: a context's window first slides after ~10 turns, then every ~5
# llms-lossless keeps FP16 KV: 8.4 MiB holds one 384-token context, so 18 MiB holds two and six contexts must take
# turns: eviction, write-back and restore run inside the crash window.
FLAGS = ["--threads", "1", "--kv-policy", "llms-lossless", "--max-context-tokens", str(MAX_CONTEXT_TOKENS),
         "--kv-budget-mb", "18"]
KILL_DELAY_MAX_S = 0.4  # a call of 8 tokens takes ~0.2-0.3 s here: delays cover prefill, decode, commit, and after
WORDS = ["river", "lamp", "garden", "violin", "harbor", "comet", "maple", "engine", "pepper", "castle", "tiger",
         "cloud", "anchor", "mirror", "desert", "bridge"]
SYSTEM_PROMPTS = [None, "You answer in one short sentence."]


def plan_prompts(seed: int, count: int) -> list[str]:
    """A context's conversation: short, distinct user turns, the same for a seed."""
    rng = random.Random(seed)
    return [f"Turn {i}: say one thing about a {rng.choice(WORDS)}." for i in range(count)]


@dataclass
class Conversation:
    """One context on the service under test and its twin, and what the harness knows about it."""
    app: str
    system_prompt: str | None
    prompts: list[str]
    ctx_id: str = ""
    twin_id: str = ""
    acked: int = 0  # turns whose reply reached the harness
    twin_replies: list[str] = field(default_factory=list)
    diverged: bool = False  # after a mismatch the twin no longer predicts this context
    in_flight: bool = False  # a call was under way when the service was killed: its turn may or may not exist


@dataclass
class Tally:
    rounds: int = 0
    kills: int = 0
    lost_turns: int = 0
    lost_contexts: int = 0
    mismatches: int = 0
    half_saved: int = 0
    phantom_turns: int = 0
    uncallable: int = 0
    window_slides: int = 0  # acknowledged calls that slid their context's window
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < 50:  # bounded: a systematic failure would otherwise repeat in every round
            self.notes.append(text)


class CrashCampaign:
    def __init__(self, rounds: int, seed: int = 0) -> None:
        self.rounds, self.rng = rounds, random.Random(seed)
        self.sut = ServiceUnderTest(FLAGS, APPS, prefix="llmaas-crash-")
        self.twin = ServiceUnderTest(FLAGS, APPS, prefix="llmaas-twin-")
        self.tally = Tally()
        self.convs: list[Conversation] = []
        self._next_seed = 0

    def run(self) -> dict:
        progress = Progress("crash", self.rounds)
        self.twin.start()
        try:
            for r in range(self.rounds):
                self.sut.start()
                if r == 0:
                    self.convs = [self._new_conversation(app, i) for app in APPS for i in range(CONTEXTS_PER_APP)]
                self._verify_all()
                self._kill_during_replay()
                self.tally.rounds += 1
                progress.step(r + 1, f"kills {self.tally.kills}, lost {self.tally.lost_turns}, mismatches "
                                     f"{self.tally.mismatches}")
            self.sut.start()  # the last kill is judged too
            self._verify_all()
        finally:
            self.sut.close()
            self.twin.close()
        t = self.tally
        return {"rounds": t.rounds, "lost_turns": t.lost_turns, "lost_contexts": t.lost_contexts,
                "mismatches": t.mismatches, "kills": t.kills, "half_saved": t.half_saved,
                "phantom_turns": t.phantom_turns, "uncallable": t.uncallable, "window_slides": t.window_slides,
                "notes": t.notes}

    # -- conversations ---------------------------------------------------------------------------------------

    def _new_conversation(self, app: str, index: int) -> Conversation:
        self._next_seed += 1
        conv = Conversation(app, SYSTEM_PROMPTS[index % len(SYSTEM_PROMPTS)], plan_prompts(self._next_seed, 200))
        with self.sut.client(app) as c:
            conv.ctx_id = c.new_context(conv.system_prompt)
        with self.twin.client(app) as c:
            conv.twin_id = c.new_context(conv.system_prompt)
        return conv

    def _twin_reply(self, conv: Conversation, turn: int) -> str:
        """The uninterrupted twin's reply to turn `turn` (computing the turns up to it once)."""
        with self.twin.client(conv.app) as c:
            while len(conv.twin_replies) <= turn:
                reply = c.call(conv.twin_id, conv.prompts[len(conv.twin_replies)], max_tokens=MAX_TOKENS,
                               temperature=0)
                conv.twin_replies.append(reply.reply)
        return conv.twin_replies[turn]

    # -- after a restart -------------------------------------------------------------------------------------

    def _verify_all(self) -> None:
        for i, conv in enumerate(self.convs):
            self.convs[i] = self._verify(conv)

    def _verify(self, conv: Conversation) -> Conversation:
        t = self.tally
        with self.sut.client(conv.app) as c:
            try:
                got = c.get(conv.ctx_id)
            except ServiceError as exc:
                t.lost_contexts += 1
                t.note(f"{conv.ctx_id}: GET after restart answered {exc}")
                return self._new_conversation(conv.app, 0)
            if not conv.diverged:
                self._twin_reply(conv, max(len(got["messages"]) // 2 - 1, 0))
            verdict = check_history(got["messages"], got["num_calls"], conv.prompts,
                                    [] if conv.diverged else conv.twin_replies, conv.acked,
                                    in_flight=conv.in_flight)
            conv.in_flight = False
            if not verdict.is_consistent:
                t.note(f"{conv.ctx_id}: {verdict} (acked {conv.acked})")
            t.lost_turns += verdict.lost_turns
            t.half_saved += int(verdict.half_saved)
            t.phantom_turns += int(verdict.phantom)
            if verdict.first_mismatch is not None:
                t.mismatches += 1
                conv.diverged = True
            conv.acked = verdict.stored_turns
            try:  # every context must be callable, and continue as the twin does
                reply = c.call(conv.ctx_id, conv.prompts[conv.acked], max_tokens=MAX_TOKENS, temperature=0)
            except ServiceError as exc:
                t.uncallable += 1
                t.note(f"{conv.ctx_id}: verification call refused: {exc}")
                return conv
            if not conv.diverged and reply.reply != self._twin_reply(conv, conv.acked):
                t.mismatches += 1
                t.note(f"{conv.ctx_id} turn {conv.acked}: {reply.reply!r} != twin {conv.twin_replies[conv.acked]!r}")
                conv.diverged = True
            conv.acked += 1
            t.window_slides += reply.window is not None
        return conv

    # -- the kill ------------------------------------------------------------------------------------------

    def _kill_during_replay(self) -> None:
        """Replay calls in a thread; SIGKILL the service a random delay after the k-th call starts."""
        started = threading.Semaphore(0)
        stop = threading.Event()
        rng = random.Random(self.rng.random())
        convs = list(self.convs)

        def replay() -> None:
            while not stop.is_set():
                conv = rng.choice(convs)
                conv.in_flight = True
                started.release()
                try:
                    with Client(self.sut.keys[conv.app], socket=self.sut.home.socket, timeout_s=30) as c:
                        if rng.random() < 0.5:
                            reply = c.call(conv.ctx_id, conv.prompts[conv.acked], max_tokens=MAX_TOKENS,
                                           temperature=0)
                        else:
                            reply = next(p for p in c.stream(conv.ctx_id, conv.prompts[conv.acked],
                                                             max_tokens=MAX_TOKENS, temperature=0)
                                         if isinstance(p, CallReply))
                except ServiceError:
                    return  # the service died under this call: it stays "in flight"
                conv.in_flight = False
                conv.acked += 1
                self.tally.window_slides += reply.window is not None

        worker = threading.Thread(target=replay, daemon=True)
        worker.start()
        for _ in range(self.rng.randint(1, 3)):
            if not started.acquire(timeout=30):
                break
        time.sleep(self.rng.uniform(0.0, KILL_DELAY_MAX_S))
        self.sut.kill9()
        self.tally.kills += 1
        stop.set()
        worker.join(timeout=60)
