"""What a context's stored history must look like after a crash: a pure checker, tested alone.

Owns the rules: messages come in user+assistant pairs and agree with num_calls (nothing half-saved), the stored turns
are a prefix of the planned conversation, no acknowledged turn is missing, at most the one unacknowledged in-flight
turn may have been added, and greedy replies equal an uninterrupted twin's. Ignores how the history was obtained.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HistoryVerdict:
    stored_turns: int  # complete user+assistant pairs found
    lost_turns: int  # acknowledged turns that are missing
    half_saved: bool  # messages not in user+assistant pairs, or not matching num_calls
    phantom: bool  # more turns than acknowledged + the one in flight, or a user message that was never sent
    first_mismatch: int | None  # index of the first stored reply that differs from the twin's (None: all equal)

    @property
    def is_consistent(self) -> bool:
        return not (self.lost_turns or self.half_saved or self.phantom or self.first_mismatch is not None)


def check_history(messages: list[dict], num_calls: int, prompts: list[str], twin_replies: list[str],
                  acked: int, in_flight: bool) -> HistoryVerdict:
    """Judge one context's `GET` messages against its plan (`prompts`), the twin's replies (as many as known), the
    number of acknowledged turns, and whether one more call was in flight when the service died."""
    turns = [m for m in messages if m.get("role") != "system"]  # a system prompt is not a turn
    pairs = len(turns) // 2
    half = len(turns) % 2 == 1 or pairs != num_calls or any(
        turns[2 * i].get("role") != "user" or turns[2 * i + 1].get("role") != "assistant" for i in range(pairs))
    phantom = pairs > acked + (1 if in_flight else 0) or any(
        i >= len(prompts) or turns[2 * i].get("content") != prompts[i] for i in range(pairs))
    mismatch = next((i for i in range(min(pairs, len(twin_replies)))
                     if turns[2 * i + 1].get("content") != twin_replies[i]), None)
    return HistoryVerdict(stored_turns=pairs, lost_turns=max(acked - pairs, 0), half_saved=half, phantom=phantom,
                          first_mismatch=mismatch)
